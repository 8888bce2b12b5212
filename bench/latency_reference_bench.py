"""Does a latency read against a reference timed in turns rank trials better than one timing each, under load?

``search.latency_reference`` (docs/search.md) rests on this. The models: the deployed OpenVINO int8 MiniLMs of a
finished search (``runs/search-minilm-3`` by default: its 18 trials, the rung's model of a trial stopped there); the
reference: the unpruned MiniLM through the same deploy and int8 stages, saved once by ``torchslim run`` (as a search
makes it). The truth: every model timed interleaved, 40 rounds, on a quiet machine, before and after. Then several
passes in which each model, in a shuffled order, is timed as a search times a trial while 0, 1 or 2 busy processes
(a Python loop each, drawn at random per model) share the 2 cores: once alone (``time_forward``, what a trial's
report holds) and once in turns with the reference through ``torchslim.engine.reference.time_against`` (the path a
trial's run takes), read as the reference's quiet latency over the paired ratio. Per pass: each reading's rank
correlation with the truth and its largest error. 1 torch thread, batch 32, 5 warm-up and 30 timed runs (the
search recipe's ``metrics``).

    PYTHONPATH=$PWD python -m bench.latency_reference_bench [--search runs/search-minilm-3] [--passes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torchslim
from bench.search_minilm_bench import context, spearman
from torchslim.engine.recipe import MetricsOptions
from torchslim.engine.reference import time_against
from torchslim.engine.timing import interleaved, time_forward

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = MetricsOptions(threads=1, warmup=5, runs=30)


def reference(folder: Path) -> Path:
    """The unpruned MiniLM deployed to OpenVINO with NNCF int8 as the search recipe's stages do, saved in ``folder``."""
    if not (folder / "model.pt").is_file():
        recipe = torchslim.load_recipe(ROOT / "bench" / "recipes" / "search-minilm-openvino.yaml").resolved()
        for key in ("search", "constraints"):
            recipe.pop(key, None)
        recipe["stages"] = recipe["stages"][2:]  # deploy, int8: the reference a search makes
        recipe["name"] = "minilm-openvino-reference"
        torchslim.run(recipe, folder, overwrite=True)
    return folder


class Load:
    """Busy processes, one per core they take."""

    def __init__(self) -> None:
        self.busy: list[subprocess.Popen[bytes]] = []

    def set(self, count: int) -> None:
        while len(self.busy) > count:
            self.busy.pop().kill()
        while len(self.busy) < count:
            self.busy.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.5)


def truth(models: dict[int, Any], ref: Any, batch: Any) -> dict[str, float]:
    """Median ms of each model and the reference, timed interleaved, 40 rounds."""
    timed = interleaved([ref, *models.values()], batch, warmup=10, runs=40, threads=1)
    return {"reference": timed[0].median, **{str(n): t.median for n, t in zip(models, timed[1:], strict=True)}}


def main() -> None:
    """Build or load the reference, time the truth, run the loaded passes, save and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", type=Path, default=ROOT / "runs" / "search-minilm-3")
    parser.add_argument("--reference", type=Path, default=ROOT / "runs" / "minilm-openvino-reference")
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latency_reference.json")
    args = parser.parse_args()
    front = json.loads((args.search / "front.json").read_text())
    full = {t["trial"]: t for t in front["trials"] if t.get("error") is None}
    ctx = context()
    batch = ctx.example_inputs
    folder = reference(args.reference)
    ref = torchslim.load_model(folder)
    models = {n: torchslim.load_model(args.search / t["folder"]) for n, t in sorted(full.items())}
    before = truth(models, ref, batch)
    print("truth before", {k: round(v, 2) for k, v in before.items()}, "load", os.getloadavg()[0], flush=True)
    load, rng, passes = Load(), random.Random(args.seed), []
    try:
        for index in range(args.passes):
            order = list(models)
            rng.shuffle(order)
            row: dict[str, Any] = {"busy": {}, "alone": {}, "paired": {}, "load_before": os.getloadavg()[0]}
            for n in order:
                busy = rng.choice([0, 1, 1, 2])
                load.set(busy)
                row["busy"][str(n)] = busy
                row["alone"][str(n)] = time_forward(models[n], batch, warmup=5, runs=30, threads=1).median
                timed = time_against(folder, models[n], ctx, OPTIONS)
                row["paired"][str(n)] = before["reference"] / timed["ratio"]
            load.set(0)
            passes.append(row)
            print(f"pass {index}: busy processes {row['busy']}", flush=True)
    finally:
        load.set(0)
    after = truth(models, ref, batch)
    names = [str(n) for n in models]
    quiet = [statistics.mean([before[n], after[n]]) for n in names]
    for row in passes:
        for kind in ("alone", "paired"):
            readings = [row[kind][n] for n in names]
            row[f"{kind}_spearman"] = round(spearman(readings, quiet), 3)
            row[f"{kind}_worst_error"] = round(max(abs(r / q - 1) for r, q in zip(readings, quiet, strict=True)), 3)
        print(
            f"rank correlation with the quiet timing: alone {row['alone_spearman']}, paired {row['paired_spearman']}; "
            f"worst error: alone {row['alone_worst_error']:.1%}, paired {row['paired_worst_error']:.1%}"
        )
    result = {
        "search": str(args.search.resolve().relative_to(ROOT)),
        "trials": [int(n) for n in names],
        "truth_before": before,
        "truth_after": after,
        "truth_agreement": spearman([before[n] for n in names], [after[n] for n in names]),
        "macs_spearman": round(spearman([full[int(n)]["final"]["macs"] for n in names], quiet), 3),
        "passes": passes,
        "cpus": os.cpu_count(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: statistics.median(r[k] for r in passes) for k in ("alone_spearman", "paired_spearman")}
    print(f"median over {len(passes)} passes: {summary}; MACs {result['macs_spearman']}; wrote {args.out}")


if __name__ == "__main__":
    main()
