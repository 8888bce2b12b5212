"""A zoo of real architectures (timm, random init) through torchslim's recipes and Torch-Pruning alone.

    python -m bench.zoo [--quick] [--models a,b] [--recipes structured,static,...] [--timeout 120]

timm is not a dependency of torchslim: install it apart, without its dependencies (docs/zoo.md):

    pip install --no-deps --target /tmp/zoo-site timm==1.0.31 huggingface_hub safetensors

and point ``ZOO_SITE`` at that directory (default ``/tmp/zoo-site``). timm imports torchvision names
at import time; ``bench/zoo_shim`` stands in for those names only (they raise if used), and is put on
``sys.path`` by this script alone.

Every model runs in its own subprocess (all its recipes, one after the other) under a timeout of
``--timeout`` seconds per recipe asked (so five recipes get five times as long as one). Each
recipe runs through :func:`torchslim.run` with ``--out`` in a temporary directory, so the engine's
reload check runs. The metric is top-1 agreement with the uncompressed model on a fixed random batch
set (the data factory labels the inputs with the uncompressed model's predictions, so ``accuracy``
is agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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
STRUCTURED = {"type": "prune", "name": "structured", "method": "structured", "amount": AMOUNT,
              "time_limit": GRAPH_SECONDS}
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
ALL_RECIPES = [*RECIPES, "tp-alone"]


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


def size_of(name: str) -> int:
    return int(ZOO[name].get("size", 64))


def build(name: str) -> Any:
    """The model factory of the zoo's recipes: timm's ``name``, random init (fixed seed), 10 classes."""
    import torch

    timm = _timm()
    torch.manual_seed(SEED)
    return timm.create_model(name, pretrained=False, num_classes=10, **ZOO[name].get("kwargs", {})).eval()


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

    size = size_of(name)
    inputs = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        labels = model(inputs).argmax(dim=1)
    return TensorDataset(inputs, labels)


def recipe(name: str, key: str) -> dict[str, Any]:
    return {
        "name": f"zoo-{name}-{key}",
        "seed": SEED,
        "model": {"target": "bench.zoo:build", "kwargs": {"name": name}},
        "data": {"target": "bench.zoo:data", "kwargs": {"name": name}},
        "evaluate": {"metric": "accuracy", "name": "agreement"},
        "metrics": {"latency": False},
        "stages": RECIPES[key],
    }


def run_recipe(name: str, key: str) -> dict[str, Any]:
    import logging

    import torchslim

    with tempfile.TemporaryDirectory() as out:
        try:
            report = torchslim.run(recipe(name, key), out, log=logging.getLogger("zoo.quiet"))
        except Exception as exc:
            return {"ok": False, "error": first_line(exc, typed=True, limit=160)}
    base, last = report.rows[0].metrics, report.rows[-1].metrics
    pruned = next((row.metrics.get("pruned_channels") for row in report.rows if row.type == "prune"), None)
    return {"ok": True, "macs": _ratio(base.get("macs"), last.get("macs")), "agreement": last.get("agreement"),
            "pruned": pruned, "reload": "ok", "notes": [n for n in report.notes if "structured" in n][:2]}


def _ratio(before: Any, after: Any) -> float | None:
    return float(before) / float(after) if before and after else None


def run_tp_alone(name: str) -> dict[str, Any]:
    """Torch-Pruning 1.6 alone: global magnitude pruning of 30% of the channels, default settings."""
    import torch
    import torch_pruning as tp

    model = build(name)
    example = torch.randn(2, 3, size_of(name), size_of(name), generator=torch.Generator().manual_seed(SEED))
    loader = data(name)["eval"]
    try:
        base_macs, _ = tp.utils.count_ops_and_params(model, example)
        ignored: list[torch.nn.Module] = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10]
        ignored += [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 10]
        before = sum(getattr(m, "out_channels", 0) or getattr(m, "out_features", 0) for m in model.modules()
                     if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m not in ignored)
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=AMOUNT, global_pruning=True, ignored_layers=ignored)
        pruner.step()
        after = sum(getattr(m, "out_channels", 0) or getattr(m, "out_features", 0) for m in model.modules()
                    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m not in ignored)
        macs, _ = tp.utils.count_ops_and_params(model, example)
        with torch.no_grad():
            agree = 100.0 * sum(int((model(x).argmax(1) == y).sum()) for x, y in loader) / SAMPLES
    except Exception as exc:
        return {"ok": False, "error": first_line(exc, typed=True, limit=160)}
    return {"ok": True, "macs": _ratio(base_macs, macs), "agreement": agree, "pruned": 1 - after / before,
            "reload": "-"}


def child(name: str, keys: list[str], result_file: str) -> None:
    """Run one model's recipes, appending one JSON line per recipe as each finishes."""
    import torch

    torch.set_num_threads(1)
    for key in keys:
        start = time.time()
        result = run_tp_alone(name) if key == "tp-alone" else run_recipe(name, key)
        result.update(model=name, recipe=key, seconds=round(time.time() - start, 1))
        with open(result_file, "a") as handle:
            handle.write(json.dumps(result) + "\n")


def run_model(name: str, keys: list[str], timeout: float) -> list[dict[str, Any]]:
    """The results of ``keys`` on model ``name``, run in a subprocess given ``timeout`` seconds per recipe."""
    timeout *= len(keys)
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as handle:
        result_file = handle.name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "bench.zoo", "--child", name, "--recipes", ",".join(keys), "--result", result_file]
    error = None
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        if done.returncode != 0:
            error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:160]
    except subprocess.TimeoutExpired:
        error = f"timeout after {timeout:.0f} s for {len(keys)} recipe(s)"
    results = [json.loads(line) for line in Path(result_file).read_text().splitlines() if line.strip()]
    os.unlink(result_file)
    seen = {r["recipe"] for r in results}
    results += [{"model": name, "recipe": key, "ok": False, "error": error or "no result"} for key in keys
                if key not in seen]
    return results


def cell(result: dict[str, Any]) -> str:
    if not result["ok"]:
        return "ERR " + str(result["error"])
    parts = []
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
        lines.append(f"| {model} | " + " | ".join(cell(index[(model, k)]) if (model, k) in index else "-"
                                                  for k in keys) + " |")
    return "\n".join(lines)


def counts(results: list[dict[str, Any]]) -> str:
    """How many models each pruning recipe pruned to >= 80% of the amount with fewer MACs."""
    lines = []
    for key in ("structured", "tp-alone"):
        rows = [r for r in results if r["recipe"] == key]
        if rows:
            good = [r for r in rows if r["ok"] and (r.get("pruned") or 0) >= 0.8 * AMOUNT and (r.get("macs") or 0) > 1.0]
            lines.append(f"{key}: {len(good)}/{len(rows)} pruned to >= {0.8 * AMOUNT:.0%} of the channels with fewer MACs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", help="comma-separated timm names (default: the whole zoo)")
    parser.add_argument("--recipes", default=",".join(ALL_RECIPES), help=f"comma-separated: {', '.join(ALL_RECIPES)}")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model and recipe: a model's subprocess, "
                        "which runs all its recipes, gets this times their number")
    parser.add_argument("--json", help="also write the results here (one JSON list)")
    parser.add_argument("--from-json", nargs="+", help="print the table of earlier --json results (later files win)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    keys = [k for k in args.recipes.split(",") if k]
    unknown = [k for k in keys if k not in ALL_RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {ALL_RECIPES}")
    if args.child:
        child(args.child, keys, args.result)
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
    try:
        _timm()
    except ImportError as exc:
        print(f"timm is not importable ({exc}); see docs/zoo.md", file=sys.stderr)
        return 2
    models = QUICK if args.quick else (args.models.split(",") if args.models else list(ZOO))
    results: list[dict[str, Any]] = []
    for name in models:
        start = time.time()
        found = run_model(name, keys, args.timeout)
        results += found
        print(f"{name}: {time.time() - start:.0f} s, " + "; ".join(f"{r['recipe']} {cell(r)}" for r in found),
              file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results, keys))
    print()
    print(counts(results))
    print(f"load average: {Path('/proc/loadavg').read_text().strip() if Path('/proc/loadavg').exists() else '?'}")
    return 0 if all(r["ok"] for r in results if args.quick) or not args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
