"""Which kernel each 4-bit ``kbit`` Linear runs: torch's int4 kernel where it was measured faster than
dequantizing, at the batch size and thread count the latency is measured at.

``auto`` times, once per distinct layer geometry (rows the layer multiplies at that batch, its shape and
format), three ways of computing one converted layer on random inputs of that size: float32 ``F.linear``
(the float layer: only said in the note), dequantize-on-the-fly + ``F.linear`` and the int4 kernel.
The calls are interleaved in rounds (the order reversed every other round), each variant repeated to
fill about half a millisecond per round, and each figure is the median over the rounds: a few
milliseconds per geometry. The int4 kernel is chosen when its median is at most ``FASTER`` times the
dequantizing path's, so that noise does not decide. The choice is recorded in each layer's format:
a reloaded model runs the same kernels without timing again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...engine.metrics import torch_threads
from ...engine.timing import in_turns
from .._layers import feed_inputs, weight_of
from .formats import Format, Kernel
from .int4pack import unsupported
from .layers import LowBitLayer

#: The int4 kernel must take at most this fraction of the dequantizing path's time to be chosen.
FASTER = 0.9
ROUNDS = 7
#: Milliseconds each variant fills in one round (a tiny layer is called several times).
ROUND_MS = 0.5


@dataclass(frozen=True)
class Decision:
    """One layer's kernel and why, as the note says it."""

    kernel: Kernel
    why: str
    vs_float32: float | None = None
    """The int4 kernel's speed relative to float32 ``F.linear`` (when timed)."""


def decide(
    model: nn.Module, formats: dict[str, Format], mode: str, batch: torch.Tensor, threads: int | None
) -> dict[str, Decision]:
    """The kernel of every ``formats`` layer of the converted ``model``: ``mode`` ``int4pack`` wherever the
    kernel can run, ``auto`` where it was also measured faster on ``batch`` at ``threads`` threads."""
    layers = dict(model.named_modules())
    reasons = {n: _why_not(layers[n], f) for n, f in formats.items()}
    able = [n for n, r in reasons.items() if r is None]
    rows = _input_rows(model, able, batch) if mode == "auto" and able else {}
    timed: dict[Any, Decision] = {}  # one timing per geometry: layers of one shape share it
    decisions = {}
    for name, reason in reasons.items():
        if reason is not None or mode == "int4pack":
            decisions[name] = Decision("dequantize", reason) if reason else Decision("int4pack", "forced, not timed")
            continue
        layer = cast(LowBitLayer, layers[name])  # _why_not said so
        key = (rows.get(name, 1), layer.shape, layer.fmt, layer.bias is None)
        if key not in timed:
            with torch_threads(threads), torch.no_grad():
                timed[key] = _verdict(_time_layer(layer, key[0]))
        decisions[name] = timed[key]
    return decisions


def apply(model: nn.Module, formats: dict[str, Format], decisions: dict[str, Decision]) -> dict[str, Format]:
    """``formats`` with the decided kernels, set on the model's layers too."""
    layers = dict(model.named_modules())
    chosen = {n: replace(f, kernel=decisions[n].kernel) for n, f in formats.items()}
    for name, fmt in chosen.items():
        layer = layers[name]
        if isinstance(layer, LowBitLayer):
            layer.fmt = fmt
            if fmt.kernel != "int4pack":
                layer._int4 = None  # packed while being timed; a layer that dequantizes never reads it
    return chosen


def note(label: str, decisions: dict[str, Decision], how: str) -> str:
    """The stage's note: which layers run the int4 kernel and which dequantize, with the reasons."""
    groups: dict[Decision, list[str]] = {}
    for name, decision in decisions.items():
        groups.setdefault(decision, []).append(name)
    parts = [f"{d.kernel} for {', '.join(names)} ({d.why})" for d, names in groups.items()]
    timed = [d.vs_float32 for d in decisions.values() if d.kernel == "int4pack" and d.vs_float32 is not None]
    if timed and max(timed) < 1:  # faster than dequantizing, yet no layer beats float32 itself
        parts.append("smaller, not faster than float32 on this CPU: the int4 kernel was slower than float32 here too")
    return f"{label}: kernels ({how}): " + "; ".join(parts)


def _why_not(layer: nn.Module, fmt: Format) -> str | None:
    if not isinstance(layer, LowBitLayer):
        return "not a packed layer"
    return _off_cpu(layer.codes.device) or unsupported(layer, fmt)


def why_not_float(layer: nn.Module, fmt: Format) -> str | None:
    """Why the int4 kernel could not run the float ``layer`` once it is converted to ``fmt``, or None."""
    return _off_cpu(weight_of(layer).device) or unsupported(layer, fmt)


def _off_cpu(device: torch.device) -> str | None:
    """Why a layer on ``device`` cannot run the int4 kernel (it is not on the CPU), or None."""
    return f"on {device}: the int4 kernel is a CPU one" if device.type != "cpu" else None


def _input_rows(model: nn.Module, names: list[str], batch: torch.Tensor) -> dict[str, int]:
    """Rows (samples x positions) each of ``names`` multiplies in a forward pass of ``batch``."""
    layers = dict(model.named_modules())
    named, rows = {layers[n]: n for n in names}, {}

    def take(layer: nn.Module, x: torch.Tensor) -> None:
        rows[named[layer]] = x.numel() // x.shape[-1]

    feed_inputs(model.eval(), named, [batch], take)
    return rows


def _time_layer(layer: LowBitLayer, rows: int) -> dict[str, float]:
    """Median ms of float32, dequantize and int4pack on ``rows`` random inputs of ``layer``."""
    x = torch.randn(rows, layer.shape[1], generator=torch.Generator().manual_seed(0))  # the run's RNG is left alone
    weight, bias = layer.weight(), layer.bias.float() if layer.bias is not None else None
    calls = {
        "float32": lambda: F.linear(x, weight, bias),
        "dequantize": lambda: layer.run(x, "dequantize"),
        "int4pack": lambda: layer.run(x, "int4pack"),
    }
    return _medians(calls)


def _medians(calls: dict[str, Callable[[], torch.Tensor]]) -> dict[str, float]:
    repeats = {name: _repeats(call) for name, call in calls.items()}  # also the warm-up (builds the int4 layout)
    timed = [partial(_ms_per_call, call, repeats[name]) for name, call in calls.items()]
    return {name: timing.median for name, timing in zip(calls, in_turns(timed, ROUNDS), strict=True)}


def _ms_per_call(call: Callable[[], torch.Tensor], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) * 1e3 / repeats


def _repeats(call: Callable[[], torch.Tensor]) -> int:
    call()
    start = time.perf_counter()
    call()
    return max(1, min(50, int(ROUND_MS / max((time.perf_counter() - start) * 1e3, 1e-3))))


def _verdict(ms: dict[str, float]) -> Decision:
    kernel: Kernel = "int4pack" if ms["int4pack"] <= FASTER * ms["dequantize"] else "dequantize"
    return Decision(
        kernel,
        f"int4 kernel {ms['dequantize'] / ms['int4pack']:.2f}x the dequantizing path's speed, "
        f"{ms['float32'] / ms['int4pack']:.2f}x float32's",
        ms["float32"] / ms["int4pack"],
    )
