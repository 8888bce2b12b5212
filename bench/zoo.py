"""A zoo of real architectures (timm, random init) through torchslim's recipes and Torch-Pruning alone.

    python -m bench.zoo [--quick] [--models a,b] [--recipes structured,static,...] [--timeout 120]
    python -m bench.zoo --wide [--recipes structured,static,tp-alone] [--timeout 90] [--results f.jsonl]
    python -m bench.zoo --recipes search4 [--timeout 120]   # a 4-trial torchslim search per model (bench/zoo_search.py)

timm is not a dependency of torchslim: install it apart, without its dependencies (docs/zoo.md):

    pip install --no-deps --target /tmp/zoo-site timm==1.0.31 huggingface_hub safetensors

and point ``ZOO_SITE`` at that directory (default ``/tmp/zoo-site``). timm imports torchvision names
at import time; ``bench/zoo_shim`` stands in for those names only (they raise if used), and is put on
``sys.path`` by this script alone.

Every model runs in its own subprocess (its recipes one after the other); a recipe that uses more than
``--timeout`` seconds of CPU time is stopped and recorded as a timeout, and the recipes after it run in
a fresh subprocess. Each recipe runs through :func:`torchslim.run` with ``--out`` in a temporary
directory, so the engine's reload check runs. The metric is top-1 agreement with the uncompressed model
on a fixed random batch set (the data factory labels the inputs with the uncompressed model's
predictions, so ``accuracy`` is agreement). Besides the named timm models, the zoo builds the
hand-written models of bench/zoo_handwritten.py (``--quick`` runs them; they need no timm) and the wide
zoo's family list (``--wide``: bench/zoo_wide.py, bench/zoo_families.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from torchslim.engine.errors import first_line

ROOT = Path(__file__).resolve().parent.parent
SHIM = Path(__file__).resolve().parent / "zoo_shim"
SITE = os.environ.get("ZOO_SITE", "/tmp/zoo-site")
SEED = 0
SAMPLES = 32

# name -> extra create_model kwargs and input size (native size where the model needs it)
ZOO: dict[str, dict[str, Any]] = {
    "resnet18": {},
    "resnext26ts": {},
    "seresnext26ts": {},
    "res2net50_14w_8s": {},
    "regnetx_002": {},
    "regnety_002": {},
    "densenet121": {},
    "dla34": {},
    "hrnet_w18_small": {},
    "cspresnet50": {},
    "repvgg_a0": {},
    "mobilenetv2_050": {},
    "mobilenetv3_small_050": {},
    "mobilenetv3_large_075": {},
    "efficientnet_b0": {},
    "efficientnet_lite0": {},
    "ghostnet_050": {},
    "mnasnet_small": {},
    "lcnet_050": {},
    "mobileone_s0": {},
    "convnext_atto": {},
    "poolformer_s12": {},
    "edgenext_xx_small": {},
    "fastvit_t8": {},
    "mobilevit_xxs": {},
    "efficientformer_l1": {"size": 224},  # its attention biases are built for 224 (7x7 tokens)
    "efficientformerv2_s0": {"kwargs": {"img_size": 64}},
    "levit_128s": {"kwargs": {"img_size": 64}},
    "vit_tiny_patch16_224": {"kwargs": {"img_size": 64}},
    "deit_tiny_patch16_224": {"kwargs": {"img_size": 64}},
    "swin_tiny_patch4_window7_224": {"kwargs": {"img_size": 64, "window_size": 4}},
    "mixer_s16_224": {"kwargs": {"img_size": 64}},
    "pit_ti_224": {"kwargs": {"img_size": 64}},
}
QUICK = ["resnet18", "mobilenetv2_050", "regnetx_002", "vit_tiny_patch16_224"]
ATTENTION = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mobilevit_xxs"]

AMOUNT = 0.3
GRAPH_SECONDS = 90  # time_limit of the dependency graph's tracing: a clear stage error instead of the model's timeout
STAGE_SHARE = 0.75
"""Run with --timeout (the child's CPU seconds per recipe), the structured stage's time_limit is this share of it, in
CPU seconds too (``time_limit_clock: cpu``): a loaded machine shortens neither, and the rest of the budget is left
for building the model, labelling the data and the measurements, so that a slow prune stops at its own limit with
what it cut instead of being stopped with the recipe (without --timeout: GRAPH_SECONDS of wall time)."""
STRUCTURED = {"type": "prune", "name": "structured", "method": "structured", "amount": AMOUNT, "time_limit": GRAPH_SECONDS}
# The same amount chosen and repaired on the calibration data (random inputs here: this checks that every
# architecture takes the measured importance and the least-squares refit, not what they buy).
MEASURED = {**STRUCTURED, "name": "obs-refit", "scope": "layer", "importance": "obs", "refit": True}
RECIPES: dict[str, list[dict[str, Any]]] = {
    "structured": [STRUCTURED],
    "obs-refit": [MEASURED],
    "static": [{"type": "quantize", "name": "static", "method": "static"}],
    "dynamic": [{"type": "quantize", "name": "dynamic", "method": "dynamic"}],
    "struct+static": [STRUCTURED, {"type": "quantize", "name": "static", "method": "static"}],
}
DEFAULT_RECIPES = [*RECIPES, "tp-alone"]
ALL_RECIPES = [*DEFAULT_RECIPES, "search4"]  # search4 (bench/zoo_search.py) runs when asked for
KEYS_WIDE = ["structured", "static", "tp-alone"]


def _timm() -> Any:
    for path in (SITE, str(SHIM)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import logging
    import warnings

    logging.getLogger("timm").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import timm

    return timm


def entry(name: str) -> dict[str, Any]:
    """How to build zoo model ``name``: its ``create_model`` kwargs and input size (the named zoo, then the
    wide zoo's family list, bench/results/zoo-wide-models.json); ``{"handwritten": True}`` for a model of
    bench/zoo_handwritten.py."""
    from bench import zoo_families, zoo_handwritten

    if name in ZOO:
        return ZOO[name]
    if name in zoo_handwritten.MODELS:
        return {"handwritten": True}
    found = next((f for f in zoo_families.load() if f.get("model") == name), None)
    if found is None:
        raise KeyError(f"{name} is neither in the named zoo, nor a wide-zoo family's model, nor hand-written")
    return {"kwargs": found.get("kwargs", {}), "size": found.get("size", 64)}


def size_of(name: str) -> int:
    return int(entry(name).get("size", 64))


def build(name: str) -> Any:
    """The model factory of the zoo's recipes: timm's ``name`` (or a hand-written model), random init
    (fixed seed), 10 classes."""
    import torch

    from bench import zoo_handwritten

    spec = entry(name)
    torch.manual_seed(SEED)
    if spec.get("handwritten"):
        return zoo_handwritten.build(name)
    timm = _timm()
    return timm.create_model(name, pretrained=False, num_classes=10, **spec.get("kwargs", {})).eval()


def example(name: str, samples: int, seed: int) -> Any:
    """``samples`` fixed random inputs for model ``name`` drawn with ``seed``: 3xSxS images for timm's
    models, each hand-written model's own kind (token ids for the recurrent ones)."""
    import torch

    from bench import zoo_handwritten

    if entry(name).get("handwritten"):
        return zoo_handwritten.inputs(name, samples, seed)
    size = size_of(name)
    return torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(seed))


def data(name: str, samples: int = SAMPLES, batch_size: int = 8) -> dict[str, Any]:
    """Fixed random inputs labelled with the uncompressed model's top-1: accuracy is agreement. The eval
    inputs are drawn with seed SEED, the train and calibration inputs with SEED + 1 (never the same)."""
    from torch.utils.data import DataLoader

    from bench.disjoint import check_splits

    model = build(name)
    held_out, other = (DataLoader(_labelled(model, name, samples, seed), batch_size=batch_size) for seed in (SEED, SEED + 1))
    loaders = {"train": other, "calibration": other, "eval": held_out}
    check_splits(loaders)
    return loaders


def _labelled(model: Any, name: str, samples: int, seed: int) -> Any:
    """``samples`` random inputs drawn with ``seed``, labelled with ``model``'s top-1."""
    import torch
    from torch.utils.data import TensorDataset

    inputs = example(name, samples, seed)
    with torch.no_grad():
        labels = model(inputs).argmax(dim=1)
    return TensorDataset(inputs, labels)


def recipe(name: str, key: str, timeout: float | None = None) -> dict[str, Any]:
    """Recipe ``key`` on model ``name``; with ``timeout`` (CPU seconds per recipe) its structured stages get a CPU
    time limit of :data:`STAGE_SHARE` of it."""
    stages = (
        RECIPES[key]
        if timeout is None
        else [
            {**stage, "time_limit": round(STAGE_SHARE * timeout, 1), "time_limit_clock": "cpu"}
            if "time_limit" in stage
            else stage
            for stage in RECIPES[key]
        ]
    )
    return {
        "name": f"zoo-{name}-{key}",
        "seed": SEED,
        "model": {"target": "bench.zoo:build", "kwargs": {"name": name}},
        "data": {"target": "bench.zoo:data", "kwargs": {"name": name}},
        "evaluate": {"metric": "accuracy", "name": "agreement"},
        "metrics": {"latency": False},
        "stages": stages,
    }


def run_recipe(name: str, key: str, timeout: float | None = None) -> dict[str, Any]:
    import logging

    import torchslim

    with tempfile.TemporaryDirectory() as out:
        try:
            report = torchslim.run(recipe(name, key, timeout), out, log=logging.getLogger("zoo.quiet"))
        except Exception as exc:
            return {"ok": False, "error": first_line(exc, typed=True, limit=400), **origin(exc)}
    base, last = report.rows[0].metrics, report.rows[-1].metrics
    pruned = next((row.metrics.get("pruned_channels") for row in report.rows if row.type == "prune"), None)
    return {
        "ok": True,
        "macs": _ratio(base.get("macs"), last.get("macs")),
        "agreement": last.get("agreement"),
        "pruned": pruned,
        "reload": "ok",
        "notes": [n for n in report.notes if "structured" in n or "eager mode" in n][:2],
    }


GRAPH_BUILDER = "build_dependency"  # Torch-Pruning's DependencyGraph entry point: a crash under it is the graph builder's


def origin(exc: BaseException) -> dict[str, Any]:
    """Where a failure came from: the innermost frame of its root cause (``file:function``, the file relative
    to its installed package), and whether it was raised while Torch-Pruning built its dependency graph."""
    chain, seen = [exc], {id(exc)}
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
        chain.append(nxt)
        seen.add(id(nxt))
    frames = [frame for link in chain for frame in traceback.extract_tb(link.__traceback__)]
    innermost = traceback.extract_tb(chain[-1].__traceback__)
    where = f"{_short(innermost[-1].filename)}:{innermost[-1].name}" if innermost else "?"
    return {"where": where, "graph_builder": any(frame.name == GRAPH_BUILDER for frame in frames)}


def _short(filename: str) -> str:
    parts = Path(filename).parts
    cut = max((i for i, part in enumerate(parts) if part in ("site-packages", "zoo-site")), default=None)
    if cut is not None:
        return "/".join(parts[cut + 1 :])
    return str(Path(filename).relative_to(ROOT)) if Path(filename).is_relative_to(ROOT) else Path(filename).name


def _ratio(before: Any, after: Any) -> float | None:
    return float(before) / float(after) if before and after else None


def run_tp_alone(name: str) -> dict[str, Any]:
    """Torch-Pruning 1.6 alone: global magnitude pruning of 30% of the channels, default settings."""
    import torch
    import torch_pruning as tp

    model = build(name)
    example_inputs = example(name, 2, SEED)
    loader = data(name)["eval"]
    try:
        base_macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
        ignored: list[torch.nn.Module] = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10]
        ignored += [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 10]
        before = sum(
            getattr(m, "out_channels", 0) or getattr(m, "out_features", 0)
            for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m not in ignored
        )
        pruner = tp.pruner.MagnitudePruner(
            model,
            example_inputs,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=AMOUNT,
            global_pruning=True,
            ignored_layers=ignored,
        )
        pruner.step()
        after = sum(
            getattr(m, "out_channels", 0) or getattr(m, "out_features", 0)
            for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m not in ignored
        )
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
        with torch.no_grad():
            agree = 100.0 * sum(int((model(x).argmax(1) == y).sum()) for x, y in loader) / SAMPLES
    except Exception as exc:
        return {"ok": False, "error": first_line(exc, typed=True, limit=400), **origin(exc)}
    return {
        "ok": True,
        "macs": _ratio(base_macs, macs),
        "agreement": agree,
        "pruned": 1 - after / before if before else 0.0,
        "reload": "-",
    }


def child(name: str, keys: list[str], result_file: str, timeout: float | None = None) -> None:
    """Run one model's recipes, appending one JSON line per recipe as each finishes."""
    import torch

    torch.set_num_threads(1)
    for key in keys:
        start = time.time()
        if key == "search4":
            from bench.zoo_search import run_search

            result = run_search(name, GRAPH_SECONDS)
        else:
            result = run_tp_alone(name) if key == "tp-alone" else run_recipe(name, key, timeout)
        result.update(model=name, recipe=key, seconds=round(time.time() - start, 1))
        with open(result_file, "a") as handle:
            handle.write(json.dumps(result) + "\n")


def run_model(name: str, keys: list[str], timeout: float) -> list[dict[str, Any]]:
    """The results of ``keys`` on model ``name``, run one after the other in a subprocess that is stopped
    when a recipe has used ``timeout`` seconds of CPU time (the first one's includes building the model). The
    recipe that ran out of time is recorded as a timeout; the recipes after it run in a fresh subprocess."""
    results: list[dict[str, Any]] = []
    while keys:
        found, error = _run_child(name, keys, timeout)
        results += found
        seen = {r["recipe"] for r in found}
        left = [key for key in keys if key not in seen]
        if left and error:
            results.append({"model": name, "recipe": left[0], "ok": False, "error": error})
            left = left[1:]
        elif left:
            results += [{"model": name, "recipe": key, "ok": False, "error": "no result"} for key in left]
            left = []
        keys = left
    return results


def _run_child(name: str, keys: list[str], timeout: float) -> tuple[list[dict[str, Any]], str | None]:
    """Run ``keys`` on ``name`` in a subprocess; its results, and why it stopped early (or None)."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as handle:
        result_file = Path(handle.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-m",
        "bench.zoo",
        "--child",
        name,
        "--recipes",
        ",".join(keys),
        "--result",
        str(result_file),
        "--timeout",
        str(timeout),
    ]
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        error = _wait(process, result_file, timeout)
        if error is None and process.returncode != 0:
            stderr.seek(0)
            lines = [line for line in stderr.read().strip().splitlines() if line.strip()]
            error = f"the model's subprocess died (exit {process.returncode}): " + (lines[-1][:160] if lines else "no message")
    results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    result_file.unlink()
    return results, error


WALL_FACTOR = 20  # a recipe that uses no CPU (a deadlock) is stopped after this many times its CPU budget of wall time


def _wait(process: subprocess.Popen[str], result_file: Path, timeout: float) -> str | None:
    """Wait for ``process``, stopping it if no recipe finished (no line added to ``result_file``) within
    ``timeout`` seconds of its CPU time (wall time where /proc cannot tell), so that a loaded machine does
    not turn slow recipes into timeouts; the timeout's message, or None if it ended by itself."""
    lines, cpu_mark, wall_mark = 0, _cpu_seconds(process.pid), time.monotonic()
    while process.poll() is None:
        now = len(result_file.read_text().splitlines())
        if now > lines:
            lines, cpu_mark, wall_mark = now, _cpu_seconds(process.pid), time.monotonic()
        cpu, wall = _cpu_seconds(process.pid), time.monotonic() - wall_mark
        used = cpu - cpu_mark if cpu is not None and cpu_mark is not None else wall
        if used > timeout or wall > WALL_FACTOR * timeout:
            process.kill()
            process.wait()
            what = "CPU " if cpu is not None and used > timeout else ""
            return f"timeout: no result after {used if what else wall:.0f} s of {what}time ({wall:.0f} s wall)"
        time.sleep(0.5)
    return None


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time (user + system) process ``pid`` has used, from /proc; None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cell(result: dict[str, Any]) -> str:
    if result.get("end") in ("clean", "raw"):  # search4's failures: how the search stopped
        return f"ERR {result['end']}: " + str(result["error"])[:160]
    if not result["ok"]:
        return "ERR " + str(result["error"])[:160]
    parts = [f"{result['trials_ok']}/{result['trials_ok'] + result['trials_failed']} trials"] if "trials_ok" in result else []
    if result.get("macs"):
        parts.append(f"{result['macs']:.2f}x")
    if result.get("pruned") is not None:
        parts.append(f"ch -{result['pruned']:.0%}")
    if result.get("agreement") is not None:
        parts.append(f"agr {result['agreement']:.0f}%")
    parts.append(f"reload {result.get('reload', '-')}")
    return "ok " + ", ".join(parts)


def table(results: list[dict[str, Any]], keys: list[str]) -> str:
    models = list(dict.fromkeys(r["model"] for r in results))
    index = {(r["model"], r["recipe"]): r for r in results}
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(cell(index[(model, k)]) if (model, k) in index else "-" for k in keys) + " |")
    return "\n".join(lines)


def counts(results: list[dict[str, Any]]) -> str:
    """How many models each pruning recipe pruned to >= 80% of the amount with fewer MACs."""
    lines = []
    for key in ("structured", "tp-alone"):
        rows = [r for r in results if r["recipe"] == key]
        if rows:
            good = [r for r in rows if r["ok"] and (r.get("pruned") or 0) >= 0.8 * AMOUNT and (r.get("macs") or 0) > 1.0]
            lines.append(f"{key}: {len(good)}/{len(rows)} pruned to >= {0.8 * AMOUNT:.0%} of the channels with fewer MACs")
    from bench.zoo_search import counts as search_counts

    return "\n".join([*lines, search_counts(results)]).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"only {', '.join(QUICK)} and the hand-written models (bench/zoo_handwritten.py)"
    )
    parser.add_argument("--models", help="comma-separated timm names (default: the whole zoo)")
    parser.add_argument("--recipes", default=None, help=f"comma-separated: {', '.join(ALL_RECIPES)}")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds of CPU time each recipe may use (the "
        "first one's includes building the model; wall time where /proc cannot tell); a recipe past it "
        "is recorded as a timeout",
    )
    parser.add_argument(
        "--wide",
        action="store_true",
        help="the wide zoo (bench/zoo_wide.py): every timm family's "
        f"smallest variant and the hand-written models, resumably; recipes default to {','.join(KEYS_WIDE)}",
    )
    parser.add_argument(
        "--results",
        help="--wide: the JSON-lines results file appended to and resumed from (default bench/results/zoo-wide.jsonl)",
    )
    parser.add_argument("--summary-only", action="store_true", help="--wide: print the summary of the results file, run nothing")
    parser.add_argument(
        "--retry",
        default="",
        help="--wide: comma-separated failure kinds to run again (e.g. 'timeout,graph "
        "time_limit' after a run on a loaded machine)",
    )
    parser.add_argument("--json", help="also write the results here (one JSON list; --wide: the summary)")
    parser.add_argument("--from-json", nargs="+", help="print the table of earlier --json results (later files win)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    keys = [k for k in (args.recipes or ",".join(KEYS_WIDE if args.wide else DEFAULT_RECIPES)).split(",") if k]
    unknown = [k for k in keys if k not in ALL_RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {ALL_RECIPES}")
    if args.child:
        child(args.child, keys, args.result, args.timeout)
        return 0
    if args.from_json:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for path in args.from_json:
            merged.update({(r["model"], r["recipe"]): r for r in json.loads(Path(path).read_text())})
        order = {name: i for i, name in enumerate(ZOO)}
        found = sorted(merged.values(), key=lambda r: order.get(r["model"], len(order)))
        print(table(found, [k for k in keys if any(r["recipe"] == k for r in found)]))
        print()
        print(counts(found))
        return 0
    from bench.zoo_handwritten import MODELS as HANDWRITTEN

    models = [*QUICK, *HANDWRITTEN] if args.quick else (args.models.split(",") if args.models else list(ZOO))
    try:
        if args.wide or any(name not in HANDWRITTEN for name in models):
            _timm()
    except ImportError as exc:
        print(f"timm is not importable ({exc}); see docs/zoo.md", file=sys.stderr)
        return 2
    if args.wide:
        from bench import zoo_wide

        return zoo_wide.main(
            keys,
            args.timeout,
            args.results,
            args.models.split(",") if args.models else None,
            args.json,
            args.summary_only,
            [k for k in args.retry.split(",") if k],
        )
    results: list[dict[str, Any]] = []
    for name in models:
        start = time.time()
        found = run_model(name, keys, args.timeout)
        results += found
        print(
            f"{name}: {time.time() - start:.0f} s, " + "; ".join(f"{r['recipe']} {cell(r)}" for r in found),
            file=sys.stderr,
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results, keys))
    print()
    print(counts(results))
    print(f"load average: {Path('/proc/loadavg').read_text().strip() if Path('/proc/loadavg').exists() else '?'}")
    return 0 if all(r["ok"] for r in results if args.quick) or not args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
