"""A latency target met by ``torchslim search``: the digits residual CNN deployed to ONNX Runtime, searched under
``constraints: {max_latency_ms: X}``, and the recommended trial's latency measured again against X.

    python -m bench.search_latency_bench [--trials 12] [--target-fraction 0.6] [--out runs/search-latency]

1. The target: the float model deployed to ONNX Runtime alone (a ``deploy`` recipe, no compression) is timed at
   the search's batch and threads; X is ``--target-fraction`` of that latency.
2. The search (bench/recipes/search-latency-resnet.yaml, X set into its constraints): structured pruning amount,
   distillation epochs and the ONNX Runtime int8 method; objectives metric and latency in the runtime; cheap
   trials first (``search.cheap``).
3. The check: among the trials that ran in full and meet X, the recommended one (``best.yaml``) has the best
   metric; ``best.yaml`` is run again by ``torchslim.run`` and its latency measured again, against X.

No latency model predicts trials: every latency is measured in the runtime (read against the search's reference,
``search.latency_reference``, since 2026-12-07; the float model's target latency in step 1 is timed alone). Writes
bench/results/search-latency.json (every trial, the choice, the remeasured latency, the load average and
threads before and after).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "bench" / "recipes" / "search-latency-resnet.yaml"
RESULTS = ROOT / "bench" / "results" / "search-latency.json"


def _load() -> str:
    return Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "not measured"


def pretrained(recipe: dict[str, Any], path: Path) -> Path:
    """The model trained once by its factory and saved as a state dict: every trial loads it (the factory skips
    its training when weights load), so a trial's time is its own stages', which the cheap rungs shorten."""
    from torchslim.engine.specs import import_target

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe["seed"])  # as torchslim seeds a build
    model = import_target(recipe["model"]["target"], "model.target")(**recipe["model"]["kwargs"])
    torch.save(model.state_dict(), path)
    return path


def runtime_latency(recipe: dict[str, Any]) -> float:
    """Median latency (ms) of the uncompressed model deployed alone, measured as the search measures a trial."""
    import torchslim

    plain = {k: copy.deepcopy(v) for k, v in recipe.items() if k not in ("search", "constraints")}
    plain["name"] = "float-in-runtime"
    plain["stages"] = [s for s in recipe["stages"] if s["type"] == "deploy"]
    report = torchslim.run(plain, None, log=logging.getLogger("bench.quiet"))
    return float(report.final.metrics["latency_ms"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search_latency_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument(
        "--target-fraction", type=float, default=0.6, help="X as a fraction of the float model's latency in the runtime"
    )
    parser.add_argument("--target-ms", type=float, help="X in milliseconds (instead of --target-fraction)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "search-latency")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the search's progress lines
    logging.getLogger("bench.quiet").setLevel(logging.WARNING)
    from torchslim.search import search

    start, load_before = time.time(), _load()
    recipe = yaml.safe_load(RECIPE.read_text())
    torch.set_num_threads(recipe["threads"])
    recipe["model"]["checkpoint"] = str(pretrained(recipe, args.out.with_name(args.out.name + "-model.pt")))
    float_ms = runtime_latency(recipe)
    target = args.target_ms if args.target_ms is not None else round(args.target_fraction * float_ms, 4)
    recipe["constraints"] = {"max_latency_ms": target}
    recipe["search"]["trials"] = args.trials
    result = search(recipe, args.out, resume=False, log=logging.getLogger("torchslim"))
    metric = result.state.metric
    full = [r for r in result.records if r.ok]
    meeting = [r for r in full if not r.misses]
    best = result.answer.best
    best_metric = max((float(r.final[metric]) for r in meeting), default=None)
    again = None
    if best is not None:
        import torchslim

        rerun = yaml.safe_load((args.out / "best.yaml").read_text())
        again = torchslim.run(rerun, None, log=logging.getLogger("bench.quiet")).final.metrics
    out = {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "runtime": "onnxruntime",
        "threads": recipe["metrics"]["threads"],
        "torch_threads": torch.get_num_threads(),
        "latency_batch": recipe["metrics"].get("batch_size", 32),
        "float_in_runtime_ms": float_ms,
        "target_ms": target,
        "target_fraction": None if args.target_ms is not None else args.target_fraction,
        "latency_model": None,
        "trials": [
            {
                "trial": r.number,
                "values": r.values,
                "stopped_after_rung": r.stopped,
                "error": r.error,
                metric: r.final.get(metric),
                "latency_ms": r.final.get("latency_ms"),
                "meets": r.ok and not r.misses,
            }
            for r in result.records
        ],
        "trials_full": len(full),
        "trials_meeting_target": len(meeting),
        "chosen": None
        if best is None
        else {
            "trial": best.number,
            "values": best.values,
            metric: best.final.get(metric),
            "latency_ms": best.final.get("latency_ms"),
            "meets": result.answer.meets,
        },
        "chosen_has_best_metric_among_meeting": best is not None
        and best_metric is not None
        and float(best.final[metric]) == best_metric,
        "rerun_of_best_yaml": None
        if again is None
        else {
            metric: again.get(metric),
            "latency_ms": again.get("latency_ms"),
            "meets": (again.get("latency_ms") or float("inf")) <= target,
        },
        "seconds": round(time.time() - start, 1),
        "loadavg_before": load_before,
        "loadavg_after": _load(),
        "cpu_count": os.cpu_count(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "trials"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
