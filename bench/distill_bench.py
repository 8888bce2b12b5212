"""Distillation recovers a pruned model, in one process or two: ``python bench/distill_bench.py [--quick]``.

Two cases on the digits residual CNN (``torchslim.examples.digits:resnet``, width 32, trained
10 epochs per seed), each through ``torchslim.run`` on a recipe:

1. ``recovery``: prune 85% of every layer's weights (``{type: prune, amount: 0.85, scope: layer}``),
   then a 6-epoch ``distill`` stage from ``original``; against the same stage with ``alpha: 0``
   (fine-tuning on the labels only, same optimizer, schedule and steps). Seeds 0, 1, 2 (the
   teacher's training and the recipe seed). Targets: distilled within 1.5 points of the unpruned
   model, and above labels-only on average. Both use ``keep: last``, so no epoch is chosen on the
   eval data the accuracy is reported on.
2. ``ddp``: the distill recipe in 1 process with 2 torch threads, in 1 process with 1 thread,
   and under ``torchrun --nproc_per_node 2`` (2 processes, 1 thread each: the same 2 cores), per
   seed, the launch order rotating. Reports accuracy, the distill stage's seconds and the whole
   command's wall time. Target: the same accuracy within noise. (1 process x 1 thread is there
   because on a busy machine 2 threads in one process can be much slower than 1: it separates
   what DDP buys from what the thread count costs.)

Writes ``bench/results/distill_bench.json``. ``--lr 0.001 --no-ddp`` reruns the recovery case at
another learning rate (``bench/results/distill_bench-lr0.001.json``). Timings are wall times on a shared machine: compare
the two columns of one run, not runs on different days.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/distill_bench.py: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tabulate import tabulate

import torchslim
from bench.disjoint import checked_spec
from torchslim import Registry
from torchslim.engine import distributed
from torchslim.examples import digits

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "distill_bench.json"
#: The distill stage under test (as in recipes/distill-recover.yaml): Adam at a peak rate of 3e-3
#: decayed by a cosine, alpha 0.5 and temperature 4 (the defaults), six epochs, the last one kept.
DISTILL = {"type": "distill", "teacher": "original", "epochs": 6, "lr": 0.003, "schedule": "cosine", "keep": "last"}


def recipe(seed: int, checkpoint: Path, epochs: int, **distill: Any) -> dict[str, Any]:
    """Trained ResNet (from ``checkpoint``) -> 85% per-layer magnitude prune -> distill."""
    return {
        "name": f"distill-bench-{seed}",
        "seed": seed,
        "model": {"target": "torchslim.examples.digits:resnet", "checkpoint": str(checkpoint)},
        "data": checked_spec({"target": "torchslim.examples.digits:loaders", "kwargs": {"image": True, "batch_size": 64}}),
        "metrics": {"latency": False},
        "stages": [
            {"type": "prune", "amount": 0.85, "scope": "layer"},
            {**DISTILL, "epochs": epochs, **distill},
        ],
    }


def teacher(seed: int, train_epochs: int, workdir: Path) -> Path:
    """Train the unpruned ResNet for one seed and save its state dict."""
    path = workdir / f"resnet-seed{seed}.pt"
    if not path.exists():
        torch.save(digits.resnet(train_epochs=train_epochs, seed=seed).state_dict(), path)
    return path


def accuracies(report: dict[str, Any]) -> dict[str, float]:
    """Baseline, pruned and distilled accuracy, distill seconds and best epoch score of one report."""
    rows = [row["metrics"] for row in report["rows"]]
    return {
        "baseline": rows[0]["accuracy"],
        "pruned": rows[1]["accuracy"],
        "final": rows[2]["accuracy"],
        "best_epoch_score": rows[2]["best_accuracy"],
        "seconds": rows[2]["seconds"],
    }


def recovery(seeds: list[int], epochs: int, train_epochs: int, workdir: Path, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Distill vs labels-only fine-tuning after the prune, per seed, in this process."""
    torch.set_num_threads(1)  # accuracy does not depend on it, and one thread suffers least on a busy machine
    results = []
    for seed in seeds:
        checkpoint = teacher(seed, train_epochs, workdir)
        for method, options in (("distill", {}), ("labels only", {"alpha": 0.0})):
            report = torchslim.run(recipe(seed, checkpoint, epochs, **extra, **options), registry=Registry.load(autoload=False))
            results.append({"seed": seed, "method": method, **accuracies(report.to_dict())})
            print(f"  recovery seed {seed} {method}: {results[-1]['final']:.2f}", file=sys.stderr, flush=True)
    return results


#: (processes, torch threads per process) of the ddp case.
LAUNCHES = ((1, 2), (1, 1), (2, 1))


def launch(processes: int, threads: int, recipe_path: Path, out: Path) -> float:
    """Run the worker in ``processes`` processes (torchrun when more than one); return the wall seconds."""
    worker = [str(Path(__file__).resolve()), "--worker", str(recipe_path), str(out)]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *worker]
    env = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - start


def ddp(seeds: list[int], epochs: int, train_epochs: int, workdir: Path, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The distill recipe in each of LAUNCHES, the order rotating from seed to seed."""
    results = []
    for index, seed in enumerate(seeds):
        path = workdir / f"ddp-{seed}.json"
        path.write_text(json.dumps(recipe(seed, teacher(seed, train_epochs, workdir), epochs, **extra)))
        for processes, threads in LAUNCHES[index % 3 :] + LAUNCHES[: index % 3]:
            out = workdir / f"ddp-{seed}-{processes}x{threads}.out.json"
            wall = launch(processes, threads, path, out)
            results.append(
                {
                    "seed": seed,
                    "processes": processes,
                    "threads": threads,
                    "wall_seconds": wall,
                    **accuracies(json.loads(out.read_text())),
                }
            )
            print(
                f"  ddp seed {seed} {processes}x{threads}: {results[-1]['final']:.2f} in {wall:.1f}s", file=sys.stderr, flush=True
            )
    return sorted(results, key=lambda r: (r["seed"], r["processes"], -r["threads"]))


def worker(recipe_path: Path, out: Path) -> None:
    """One process of the ddp case: run the recipe; rank 0 writes the report."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report = torchslim.run(json.loads(recipe_path.read_text()), registry=Registry.load(autoload=False))
    if distributed.is_main():
        out.write_text(json.dumps(report.to_dict()))
    distributed.destroy()


def summary(recovered: list[dict[str, Any]], scaled: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds and the targets' verdicts."""

    def mean(rows: list[dict[str, Any]], key: str, **where: Any) -> float:
        return statistics.fmean(r[key] for r in rows if all(r[k] == v for k, v in where.items()))

    def median(rows: list[dict[str, Any]], key: str, **where: Any) -> float:
        return float(statistics.median(r[key] for r in rows if all(r[k] == v for k, v in where.items())))

    baseline = mean(recovered, "baseline", method="distill")
    distilled, labels = mean(recovered, "final", method="distill"), mean(recovered, "final", method="labels only")
    return {
        "baseline": baseline,
        "pruned": mean(recovered, "pruned", method="distill"),
        "distill": distilled,
        "labels_only": labels,
        "distill_within_1.5": baseline - distilled <= 1.5,
        "distill_above_labels_only": distilled > labels,
        "ddp": {
            f"{p}x{t}": {
                "accuracy": mean(scaled, "final", processes=p, threads=t),
                "median_stage_seconds": median(scaled, "seconds", processes=p, threads=t),
                "median_wall_seconds": median(scaled, "wall_seconds", processes=p, threads=t),
            }
            for p, t in LAUNCHES
            if scaled
        },
    }


def print_tables(recovered: list[dict[str, Any]], scaled: list[dict[str, Any]], totals: dict[str, Any]) -> None:
    """The two tables and the verdicts."""
    rows = [
        [
            r["seed"],
            r["method"],
            f"{r['baseline']:.2f}",
            f"{r['pruned']:.2f}",
            f"{r['final']:.2f}",
            f"{r['final'] - r['baseline']:+.2f}",
            f"{r['best_epoch_score']:.2f}",
            f"{r['seconds']:.1f}",
        ]
        for r in recovered
    ]
    print(
        tabulate(
            rows, headers=["seed", "method", "unpruned", "pruned 85%", "after 6 epochs", "vs unpruned", "best epoch", "stage s"]
        )
    )
    print(
        f"\nmean over seeds: unpruned {totals['baseline']:.2f}, pruned {totals['pruned']:.2f}, "
        f"distill {totals['distill']:.2f}, labels only {totals['labels_only']:.2f}; "
        f"distill within 1.5 points: {totals['distill_within_1.5']}, "
        f"above labels only: {totals['distill_above_labels_only']}\n"
    )
    if not scaled:
        return
    rows = [
        [r["seed"], r["processes"], r["threads"], f"{r['final']:.2f}", f"{r['seconds']:.1f}", f"{r['wall_seconds']:.1f}"]
        for r in scaled
    ]
    print(tabulate(rows, headers=["seed", "processes", "threads each", "accuracy", "distill stage s", "command wall s"]))
    print()
    rows = [
        [launch, f"{v['accuracy']:.2f}", f"{v['median_stage_seconds']:.1f}", f"{v['median_wall_seconds']:.1f}"]
        for launch, v in totals["ddp"].items()
    ]
    print(tabulate(rows, headers=["processes x threads", "mean accuracy", "median stage s", "median wall s"]))


def main() -> None:
    """Parse arguments, run both cases (or one worker process), print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 2 epochs, a briefly trained teacher")
    parser.add_argument("--lr", type=float, help="the distill stages' lr instead of 0.003 (results in distill_bench-lr<LR>.json)")
    parser.add_argument("--no-ddp", action="store_true", help="the recovery case only")
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    seeds, epochs, train_epochs = ([0], 2, 3) if args.quick else ([0, 1, 2], 6, 10)
    extra = {"lr": args.lr} if args.lr else {}
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        recovered = recovery(seeds, epochs, train_epochs, Path(tmp), extra)
        scaled = [] if args.no_ddp else ddp(seeds, epochs, train_epochs, Path(tmp), extra)
    totals = summary(recovered, scaled)
    print_tables(recovered, scaled, totals)
    results = RESULTS.with_name(f"distill_bench-lr{args.lr:g}.json") if args.lr else RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    payload = {
        "mode": "quick" if args.quick else "full",
        "recovery": recovered,
        "ddp": scaled,
        "summary": totals,
        "distill_stage": {**DISTILL, **extra},
        "environment": environment,
    }
    results.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {results.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
