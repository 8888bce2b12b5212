"""Mixed precision without training (PTQ) on the pretrained MNIST CNN: per-layer bits from a sensitivity pass
and a knapsack, against uniform bits, at the size budget of uniform binary weights and of uniform 2-bit.

    python bench/mixed_precision_bench.py [--batches 8] [--out runs/mixed_precision] [--trials 12] [--joint-trials 30]

For each budget: the uniform model (``quantize`` binary, or kbit 2-bit, every Linear and Conv2d), the
sensitivity pass of that stage (each layer alone at 1, 2, 3, 4 and 8 bits, output error on the first calibration
batches: validation images, never the test images), the knapsack's ``layer_bits`` within the uniform model's
weight bits, and that recipe run. Accuracy is on the 10,000 MNIST test images; size is the packed file's bytes
(``packed_bytes``) as torchslim measures it. The calibration and evaluation splits are checked disjoint in code
(:mod:`bench.disjoint`) before anything is measured.

At the 2-bit budget a short search follows (``--trials``; 0: none): ``torchslim search`` over ``layer_bits``
(``per_layer``, choices 1, 2, 3, 4, 8; its first trial the knapsack's), accuracy maximised within the uniform
model's packed bytes (``max_packed_mb``). The search is scored on 5,000 validation images (the 2,048 after the
calibration images: checked disjoint from both), never on the test images; its recommended ``layer_bits`` is then
run once on the test images.

At the binary budget, where every layer at 1 bit is the only allocation of bits alone, a joint search follows
(``--joint-trials``; ``--only-joint`` runs it alone and adds it to the results file): a structured cut per group
of coupled channels (no training) before the quantize, and per-layer bits, within the uniform binary model's
packed bytes; scored and tested as the short search is.

Writes ``bench/results/mixed_precision.json`` with the load average and thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/mixed_precision_bench.py: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import DataLoader, TensorDataset

import torchslim
from bench.disjoint import check_disjoint, checked_spec
from torchslim.engine.recipe import validate
from torchslim.engine.registry import Registry
from torchslim.engine.yamlio import Document
from torchslim.examples import mnist
from torchslim.search.sensitivity import measure
from torchslim.search.sensitivity_files import knapsack, predicted_error, stage_table

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_precision.json"
RUNS = Path(__file__).resolve().parent.parent / "runs" / "mixed_precision"
THREADS = 1
BITS = (1.0, 2.0, 3.0, 4.0, 8.0)
#: The uniform stages whose weight bits are the budgets.
BUDGETS = {"binary": {"method": "binary"}, "2-bit": {"method": "kbit", "bits": 2}}
DATA = {"target": "torchslim.examples.mnist:loaders", "kwargs": {"batch_size": 256}}
#: The search's data: the same calibration images, scored on validation images after them (not the test images).
SEARCH_DATA = {"target": "bench.mixed_precision_bench:search_loaders", "kwargs": {"batch_size": 256}}
CALIBRATION = 2048
SEARCH_EVAL = 5000


def search_loaders(batch_size: int = 256) -> dict[str, Any]:
    """MNIST's loaders with ``eval`` the 5,000 validation images after the calibration ones: what a search
    chooses on, so that the test images only report."""
    loaders = mnist.loaders(batch_size=batch_size, calibration_size=CALIBRATION)
    images, labels = mnist.dataset("valid").tensors
    held = TensorDataset(images[CALIBRATION : CALIBRATION + SEARCH_EVAL], labels[CALIBRATION : CALIBRATION + SEARCH_EVAL])
    check_disjoint(DataLoader(held, batch_size=500), test=loaders["eval"])
    return {**loaders, "eval": DataLoader(held, batch_size=500)}


def recipe(stage: dict[str, Any], name: str, data: dict[str, Any] = DATA) -> dict[str, Any]:
    """The MNIST CNN with one quantize stage; its data built through bench.disjoint's check."""
    return {
        "name": name,
        "seed": 0,
        "threads": THREADS,
        "model": {"target": "torchslim.examples.mnist:cnn"},
        "data": checked_spec(data),
        "evaluate": {"metric": "accuracy"},
        "metrics": {"threads": THREADS, "latency": False},
        "stages": [{"type": "quantize", "name": "quantize", **stage}],
    }


def final(report: Any) -> dict[str, float]:
    """Accuracy and packed bytes of a run's last row."""
    metrics = report.rows[-1].metrics
    return {"accuracy": metrics["accuracy"], "packed_bytes": metrics["packed_bytes"], "size_bytes": metrics["size_bytes"]}


def one_budget(label: str, stage: dict[str, Any], batches: int, out: Path) -> dict[str, Any]:
    """Uniform vs knapsack at the weight-bit budget of ``stage``."""
    uniform = final(torchslim.run(recipe(stage, f"uniform-{label}")))
    data = recipe(stage, f"sensitivity-{label}")
    start = time.perf_counter()
    sens = measure(validate(Document(data, "<bench>"), Registry.load()), out, settings=BITS, batches=batches).stages[0]
    seconds = time.perf_counter() - start
    print(stage_table(sens))
    chosen = knapsack(sens)
    row: dict[str, Any] = {
        "budget": label,
        "uniform_stage": stage,
        "uniform": uniform,
        "sensitivity_seconds": round(seconds, 1),
        "sensitivity_cached": sens.cached,
        "uniform_output_error": sens.uniform.error,
        "knapsack": chosen,
    }
    if chosen is None:
        return {**row, "mixed": None}
    mixed_stage = {**stage, "layer_bits": chosen}
    row["predicted_output_error"] = predicted_error(sens, chosen)
    row["mixed"] = final(torchslim.run(recipe(mixed_stage, f"mixed-{label}")))
    row["weight_bits"] = {
        "uniform": sens.uniform.cost,
        "mixed": sum(p.cost or 0.0 for p in sens.probes if chosen.get(p.unit) == p.setting),
    }
    row["gain_points"] = row["mixed"]["accuracy"] - uniform["accuracy"]
    return row


def timed_search(data: dict[str, Any], out: Path) -> tuple[Any, float]:
    """``torchslim search`` of ``data`` into ``out`` (resumed where a study is there) and its seconds."""
    from torchslim.search import search

    start = time.perf_counter()
    result = search(data, out, resume=(out / "study.journal").exists())
    return result, time.perf_counter() - start


def short_search(stage: dict[str, Any], uniform: dict[str, float], trials: int, out: Path) -> dict[str, Any]:
    """A search over layer_bits within the uniform model's packed bytes, scored on validation images; its
    recommendation run once on the test images."""
    data = recipe(stage, "search-2bit", SEARCH_DATA)
    data["search"] = {
        "space": {"stages.0.layer_bits": {"per_layer": {"choices": [1, 2, 3, 4, 8]}}},
        "objectives": ["metric"],
        "trials": trials,
        "startup_trials": 4,
        "seed": 0,
    }
    data["constraints"] = {"max_packed_mb": uniform["packed_bytes"] / 1e6}
    result, seconds = timed_search(data, out)
    best = result.answer.best
    if best is None:
        return {"trials": len(result.records), "seconds": round(seconds, 1), "best": None}
    chosen = best.values["stages.0.layer_bits"]
    tested = final(torchslim.run(recipe({**stage, "layer_bits": chosen}, "search-best-2bit")))
    return {
        "trials": len(result.records),
        "seconds": round(seconds, 1),
        "meets_constraints": result.answer.meets,
        "best_trial": best.number,
        "layer_bits": chosen,
        "validation_accuracy": best.final.get("accuracy"),
        "first_trial_validation_accuracy": result.records[0].final.get("accuracy"),
        "test": tested,
        "gain_points": tested["accuracy"] - uniform["accuracy"],
    }


#: The joint search at the binary budget: a structured cut per group of coupled channels (no training) frees bits
#: that layers more sensitive than the widest one can then take; per-layer bits alone cannot move under that budget
#: (every layer at 1 bit is the only allocation that fits).
JOINT_SPACE = {
    "stages.0.group_amounts": {"per_group": {"choices": [0.0, 0.125, 0.25]}},
    "stages.1.layer_bits": {"per_layer": {"choices": [1, 2, 3, 4, 8]}},
}
#: Validation needs an ``amount``; every group's own amount comes from ``group_amounts`` (the search sets them all).
CUT = {"type": "prune", "name": "cut", "method": "structured", "scope": "layer", "amount": 0.1}


def joint_search(stage: dict[str, Any], uniform: dict[str, float], trials: int, out: Path) -> dict[str, Any]:
    """A search over per-group structured amounts and per-layer bits within the uniform model's packed bytes,
    scored on validation images; its recommendation run once on the test images."""
    data = recipe(stage, "joint-search", SEARCH_DATA)
    data["stages"].insert(0, dict(CUT))
    data["search"] = {"space": JOINT_SPACE, "objectives": ["metric"], "trials": trials, "startup_trials": 8, "seed": 0}
    data["constraints"] = {"max_packed_mb": uniform["packed_bytes"] / 1e6}
    result, seconds = timed_search(data, out)
    best = result.answer.best
    row: dict[str, Any] = {"trials": len(result.records), "seconds": round(seconds, 1), "space": JOINT_SPACE}
    if best is None:
        return {**row, "best": None}
    chosen = {k: best.values[k] for k in JOINT_SPACE}
    tested_recipe = recipe({**stage, "layer_bits": chosen["stages.1.layer_bits"]}, "joint-best")
    tested_recipe["stages"].insert(0, {**CUT, "group_amounts": chosen["stages.0.group_amounts"]})
    tested = final(torchslim.run(tested_recipe))
    return {
        **row,
        "feasible": sum(1 for r in result.records if r.error is None and not r.misses),
        "meets_constraints": result.answer.meets,
        "best_trial": best.number,
        "chosen": chosen,
        "validation_accuracy": best.final.get("accuracy"),
        "test": tested,
        "gain_points": tested["accuracy"] - uniform["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of 256 images the pass compares")
    parser.add_argument("--out", type=Path, default=RUNS, help="sensitivity cache and search folders")
    parser.add_argument("--trials", type=int, default=12, help="trials of the short search at the 2-bit budget (0: none)")
    parser.add_argument(
        "--joint-trials", type=int, default=24, help="trials of the prune + bits search at the binary budget (0: none)"
    )
    parser.add_argument("--only-joint", action="store_true", help="run the joint search alone, added to the results file")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    if args.only_joint:
        result = json.loads(RESULTS.read_text())
        row = result["rows"][0]
        row["joint_search"] = joint_search(BUDGETS["binary"], row["uniform"], args.joint_trials, args.out / "joint-binary")
        row["joint_search"].update(threads=THREADS, load_before=" ".join(load_before), load_after=_load())
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(row["joint_search"], indent=1))
        return
    rows = [one_budget(label, stage, args.batches, args.out) for label, stage in BUDGETS.items()]
    if args.joint_trials:
        rows[0]["joint_search"] = joint_search(
            BUDGETS["binary"], rows[0]["uniform"], args.joint_trials, args.out / "joint-binary"
        )
    if args.trials:
        rows[1]["search"] = short_search(BUDGETS["2-bit"], rows[1]["uniform"], args.trials, args.out / "search-2bit")
    result = {
        "model": "ccexam MNIST CNN (pretrained, 99.05% float)",
        "eval": "10,000 MNIST test images",
        "calibration": f"first {args.batches} x 256 MNIST validation images (checked disjoint from eval)",
        "bits_tried": BITS,
        "rows": rows,
        "threads": THREADS,
        "load_before": " ".join(load_before),
        "load_after": _load(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        mixed = row["mixed"] or {}
        print(
            f"{row['budget']}: uniform {row['uniform']['accuracy']:.2f}% ({row['uniform']['packed_bytes']} B), "
            f"knapsack {mixed.get('accuracy', float('nan')):.2f}% ({mixed.get('packed_bytes')} B), bits {row['knapsack']}"
        )
    print(f"load {result['load_before']} -> {result['load_after']}, {THREADS} thread(s); wrote {RESULTS}")


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    main()
