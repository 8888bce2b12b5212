"""Low-bit CPU kernels of torch against float32 and against dequantize-on-the-fly + ``F.linear``.

    python -m bench.lowbit_kernels [--rounds 9] [--runs 30]

For each Linear shape and batch size, every variant is timed in interleaved rounds (a round times
each variant ``--runs`` times after warm-up and keeps the median; the figure is the median over
rounds), at 1 and at 2 torch threads; the load average is recorded before and after. Variants:

- ``float32``: ``F.linear`` on the float weights (the reference).
- ``dequant int8`` / ``dequant int4``: what torchslim's low-bit layers do when no kernel is faster:
  codes -> float weights (times the per-channel scales) at every call, then ``F.linear``.
- ``int8pack``: ``torch.ops.aten._weight_int8pack_mm`` (int8 weights, per-channel scales).
- ``int4pack``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on weights packed by
  ``_convert_weight_to_int4pack_for_cpu`` (groups of 32; float32 and bfloat16 activations).
- ``float8 scaled_mm``: ``torch._scaled_mm`` with float8_e4m3fn weights AND activations (the only
  form the CPU kernel takes: the activations are quantized per call too).
- ``layer dequantize`` / ``layer int4pack``: torchslim's own 4-bit layer (``kbit``, asymmetric, groups of
  32) computing the Linear both ways ``kernel: auto`` chooses between: unpacking its bit stream at every
  call, or torch's int4 kernel with the inputs cast to bfloat16 and the output back to float32.

Writes ``bench/results/lowbit_kernels.json``; the table is in docs/quantize.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from torchslim.plugins.quantize.formats import Format, quantize
from torchslim.plugins.quantize.layers import LowBitLayer

RESULTS = Path(__file__).resolve().parent / "results" / "lowbit_kernels.json"
#: (batch, in_features, out_features): a large LLM-style layer at batch 1 and 32, and the digits MLP's hidden
#: layer at batch 64 and at 32 (metrics.batch_size's default).
SHAPES = ((1, 1024, 4096), (32, 1024, 4096), (64, 256, 256), (32, 256, 256))
GROUP = 32


def loadavg() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def variants(batch: int, k: int, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Every way of computing one Linear, as zero-argument calls."""
    torch.manual_seed(0)
    x, w = torch.randn(batch, k), torch.randn(n, k) * 0.05
    scale = w.abs().amax(1) / 127
    q8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    calls = {
        "float32": lambda: F.linear(x, w),
        "dequant int8": lambda: F.linear(x, q8.float() * scale[:, None]),
        "int8pack": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, scale),
    }
    calls.update(_int4(x, w))
    calls.update(_float8(x, w))
    calls.update(_layer(x, w))
    return calls


def _layer(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    fmt = Format("int", 4, symmetric=False, group_size=GROUP)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = LowBitLayer.convert(linear, fmt, quantize(w, fmt))
    return {"layer dequantize": lambda: layer.run(x, "dequantize"), "layer int4pack": lambda: layer.run(x, "int4pack")}


def _int4(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    n, k = w.shape
    groups = w.view(n, k // GROUP, GROUP)
    lo, hi = groups.amin(2), groups.amax(2)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).view(n, k)
    # The kernel's zeros are float offsets around the middle code 8: w = (q - 8) * s + zero.
    zeros = lo + 8 * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    sz = torch.stack([scale.t(), zeros.t()], dim=2).contiguous()
    xb, szb = x.bfloat16(), sz.bfloat16()
    codes8 = codes.to(torch.uint8)
    return {
        "dequant int4": lambda: F.linear(x, ((codes8.view(n, -1, GROUP).float() * scale[..., None]) + lo[..., None]).view(n, k)),
        "int4pack fp32": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz),
        "int4pack bf16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, szb),
    }


def _float8(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    f8 = torch.float8_e4m3fn
    w_scale = (w.abs().amax() / torch.finfo(f8).max).float()
    w8 = (w / w_scale).to(f8)
    one = torch.ones((), dtype=torch.float32)

    def scaled() -> torch.Tensor:
        x_scale = (x.abs().amax() / torch.finfo(f8).max).float()
        return torch._scaled_mm((x / x_scale).to(f8), w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.float32)

    return {"float8 scaled_mm": scaled, "dequant float8": lambda: F.linear(x, w8.float() * (w_scale * one))}


def time_round(calls: dict[str, Callable[[], torch.Tensor]], runs: int) -> dict[str, float]:
    """One interleaved round: each variant's median over ``runs`` calls, in ms."""
    result = {}
    for name, call in calls.items():
        for _ in range(3):
            call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        result[name] = statistics.median(times)
    return result


def measure(shape: tuple[int, int, int], threads: int, rounds: int, runs: int) -> dict[str, object]:
    """Medians over interleaved rounds for one shape at ``threads`` threads."""
    torch.set_num_threads(threads)
    calls, failed = {}, {}
    for name, call in variants(*shape).items():
        try:
            call()
            calls[name] = call
        except Exception as exc:  # a kernel missing on this build is a result, not a crash
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    before = loadavg()
    rounds_ms = [time_round(calls, runs) for _ in range(rounds)]
    ms = {name: statistics.median(r[name] for r in rounds_ms) for name in calls}
    return {
        "shape": list(shape),
        "threads": threads,
        "load_before": before,
        "load_after": loadavg(),
        "ms": ms,
        "x_vs_float32": {n: ms["float32"] / v for n, v in ms.items()},
        "failed": failed,
    }


def table(results: list[dict[str, object]]) -> str:
    """A Markdown table: ms and speed relative to float32 per variant."""
    names = list(results[0]["ms"])  # type: ignore[arg-type]
    lines = ["| batch x in -> out | threads | load | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in results:
        b, k, n = r["shape"]  # type: ignore[misc]
        cells = [f"{r['ms'][m]:.3f} ({r['x_vs_float32'][m]:.2f}x)" for m in names]  # type: ignore[index]
        lines.append(f"| {b} x {k} -> {n} | {r['threads']} | {r['load_before']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Measure every shape at 1 and 2 threads, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    results = [measure(shape, threads, args.rounds, args.runs) for shape in SHAPES for threads in (1, 2)]
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    print(table(results))
    for r in results:
        if r["failed"]:
            print(r["shape"], r["threads"], r["failed"])


if __name__ == "__main__":
    main()
