"""Low-bit weight formats: how a float weight becomes codes and scales, and back.

Every integer format is affine per output channel (or per group of ``group_size`` input features):
``w = (code - zero) * scale`` with codes in ``[0, 2**bits)``: a symmetric format's fixed zero and its scales
follow its :data:`Grid`, an asymmetric one stores a zero per group and spans the group's min..max. Binary is
``code in {0, 1}``, zero 0.5 and scale twice mean |w| (so ``w = sign * mean|w|``, XNOR-Net); ternary is
``code in {0, 1, 2}``, zero 1 (ternary weight networks: threshold 0.7 * mean |w|, scale the mean |w| above
it). float8 codes are float8 values times a per-channel scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

Kind = Literal["binary", "ternary", "int", "float8"]
Kernel = Literal["dequantize", "int4pack"]
#: Where a symmetric integer format puts its levels, ``m`` being a group's largest |w| (docs/quantize.md has the
#: measurements): ``skewed``: codes ``-2**(b-1) .. 2**(b-1) - 1`` times ``2m / (2**b - 1)`` (2 bits: ``{-4m/3, -2m/3,
#: 0, 2m/3}``, ``+m`` clipped, ``-m`` overshot), torchslim's only grid before issue 23; ``mse``: the same codes with
#: each group's step chosen among :data:`MSE_FRACTIONS` of skewed's to leave the least squared rounding error
#: (clipping the largest weights where finer steps pay more); ``narrow``: ``-(2**(b-1) - 1) .. 2**(b-1) - 1`` times
#: ``m / (2**(b-1) - 1)``, zero and both extremes exact, one code unused (2 bits: ``{-m, 0, m}``); ``midrise``: all
#: ``2**b`` levels evenly from ``-m`` to ``m``, no zero (2 bits: ``{-m, -m/3, m/3, m}``).
Grid = Literal["mse", "skewed", "narrow", "midrise"]
#: The grid of a saved format record that names none: every record written before grids were an option.
LEGACY_GRID: Grid = "skewed"
#: The steps the ``mse`` grid tries, as fractions of the skewed grid's: 1 (skewed's own) down to 0.05.
MSE_FRACTIONS = tuple((20 - i) / 20 for i in range(20))
#: Threshold of ternary weight networks (Li & Liu 2016): 0.7 * mean |w| approximates the optimum.
TWN_THRESHOLD = 0.7


@dataclass(frozen=True)
class Format:
    """One layer's weight format and how the layer runs; plain data, saved in the restore record."""

    kind: Kind
    bits: int
    symmetric: bool = True
    group_size: int | None = None
    float8: str = "float8_e4m3fn"
    storage: str = "float32"
    """dtype of the saved scales and bias: float16 where every value is a normal float16, else float32."""
    activations: Literal["float", "binary"] = "float"
    """The layer's inputs: ``float`` as given, or ``binary``: sign(x) times the sample's mean |x| (XNOR-Net)."""
    kernel: Kernel = "dequantize"
    """How a Linear computes: dequantize its weight at each call, or torch's int4 kernel (bfloat16 inputs)."""
    grid: Grid = "mse"
    """Where a symmetric ``int`` format's levels lie (:data:`Grid`); unused by the other formats."""

    @classmethod
    def of(cls, record: dict[str, Any]) -> Format:
        """The format :meth:`record` wrote (a record without ``grid`` predates it: :data:`LEGACY_GRID`)."""
        return cls(**{"grid": LEGACY_GRID, **record})

    def record(self) -> dict[str, Any]:
        """As plain data."""
        return asdict(self)

    def describe(self) -> str:
        """``int4 asymmetric, groups of 32`` and the like."""
        if self.kind == "float8":
            return f"{self.float8}, scale per channel"
        if self.kind != "int":
            inputs = ", binary activations" if self.activations == "binary" else ""
            return f"{self.kind}, scale per channel{inputs}"
        scales = f"groups of {self.group_size}" if self.group_size else "per channel"
        return f"int{self.bits} {f'symmetric {self.grid}' if self.symmetric else 'asymmetric'}, {scales}"

    def groups(self, features: int) -> int:
        """Scale groups along ``features`` input features."""
        return features // self.group_size if self.group_size else 1


def storage_for(scale: torch.Tensor, bias: torch.Tensor | None) -> str:
    """``float16`` if the scales are normal float16 numbers (they multiply every weight: their relative
    precision matters) and the bias fits float16's range (its absolute error stays below 6e-8); else ``float32``."""
    info = torch.finfo(torch.float16)
    scale = scale.detach().abs()
    if bool(((scale < info.tiny) | (scale > info.max)).any()):
        return "float32"
    return "float32" if bias is not None and bool((bias.detach().abs() > info.max).any()) else "float16"


@dataclass
class QWeight:
    """A quantized 2-D weight (out x in): codes (uint8, or float8), scales and zeros per group."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | float


def quantize(weight: torch.Tensor, fmt: Format) -> QWeight:
    """Round ``weight`` (out x in, float) to ``fmt`` (nearest level)."""
    w = weight.detach().float()
    grouped = w.view(w.shape[0], fmt.groups(w.shape[1]), -1)
    scale, zero = scales(grouped, fmt)
    return QWeight(encode(grouped, scale, zero, fmt).view(w.shape), scale, zero)


def scales(grouped: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Scale (out x groups) and zero point of ``grouped`` weights (out x groups x size)."""
    absw = grouped.abs()
    if fmt.kind == "binary":
        return _nonzero(2 * absw.mean(2)), 0.5
    if fmt.kind == "ternary":
        above = absw > TWN_THRESHOLD * absw.mean(2, keepdim=True)
        return _nonzero((absw * above).sum(2) / above.sum(2).clamp(min=1)), 1.0
    if fmt.kind == "float8":
        return _nonzero(absw.amax(2) / torch.finfo(getattr(torch, fmt.float8)).max), 0.0
    levels = 2**fmt.bits - 1
    if fmt.symmetric:
        return _symmetric_scale(grouped, absw.amax(2), fmt), symmetric_zero(fmt)
    low, high = grouped.amin(2).clamp(max=0), grouped.amax(2).clamp(min=0)
    scale = _nonzero((high - low) / levels)
    return scale, torch.round(-low / scale).clamp(0, levels)


def _symmetric_scale(grouped: torch.Tensor, absmax: torch.Tensor, fmt: Format) -> torch.Tensor:
    if fmt.grid == "narrow":
        return _nonzero(absmax / (2 ** (fmt.bits - 1) - 1))
    widest = _nonzero(2 * absmax / (2**fmt.bits - 1))  # skewed and midrise: 2**b - 1 steps span 2m
    return _least_error(grouped, widest, fmt) if fmt.grid == "mse" else widest


def _least_error(grouped: torch.Tensor, widest: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per group, the step among :data:`MSE_FRACTIONS` of ``widest`` that rounds ``grouped`` with the least
    squared error (on a tie the wider: a group of zeros keeps ``widest``)."""
    zero = symmetric_zero(fmt)
    best, least = widest, torch.full_like(widest, torch.inf)
    for fraction in MSE_FRACTIONS:
        scale = widest * fraction
        error = ((encode(grouped, scale, zero, fmt).float() - zero) * scale[..., None] - grouped).square().sum(2)
        better = error < least
        best, least = torch.where(better, scale, best), torch.where(better, error, least)
    return best


def symmetric_zero(fmt: Format) -> float:
    """The fixed zero point of a symmetric ``int`` format: ``(2**bits - 1) / 2`` (no code is zero) on the midrise
    grid, else ``2**(bits - 1)``."""
    return (2**fmt.bits - 1) / 2 if fmt.grid == "midrise" else float(2 ** (fmt.bits - 1))


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # A group of zeros (pruned) has no range; any scale codes it exactly as zero.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def encode(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, fmt: Format) -> torch.Tensor:
    """Codes of ``grouped`` weights (out x groups x size) at the given scales."""
    s = scale[..., None]
    z = zero[..., None] if isinstance(zero, torch.Tensor) else zero
    if fmt.kind == "float8":
        return (grouped / s).to(getattr(torch, fmt.float8))
    if fmt.kind == "binary":
        return (grouped >= 0).to(torch.uint8)
    if fmt.kind == "ternary":
        keep = grouped.abs() > TWN_THRESHOLD * grouped.abs().mean(2, keepdim=True)
        return (torch.sign(grouped) * keep + 1).to(torch.uint8)
    midrise = fmt.symmetric and fmt.grid == "midrise"  # levels halfway between integers: the floor's is the nearest
    codes = torch.floor(grouped / s) + (z + 0.5) if midrise else torch.round(grouped / s) + z
    lowest = 1 if fmt.symmetric and fmt.grid == "narrow" else 0  # narrow: code 0 (-2**(b-1)) is not a level
    return codes.clamp(lowest, 2**fmt.bits - 1).to(torch.uint8)


def dequantize(q: QWeight) -> torch.Tensor:
    """The float weight (out x in) ``q`` stands for (its codes, scales and zeros say everything the format does)."""
    out = q.scale.shape[0]
    grouped = q.codes.reshape(out, q.scale.shape[1], -1).float()
    z = q.zero[..., None].float() if isinstance(q.zero, torch.Tensor) else q.zero
    return ((grouped - z) * q.scale[..., None].float()).view(out, -1)


def fake_quantize(weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``weight`` rounded to ``fmt`` in the forward pass, the identity in the backward pass (straight-through)."""
    flat = weight.reshape(weight.shape[0], -1)
    q = quantize(flat, fmt)
    if fmt.kind in ("binary", "ternary"):
        # Their scales are means of |w|: the gradient reaches the weights through the scale too (XNOR-Net).
        q.scale = scales(flat.view(flat.shape[0], fmt.groups(flat.shape[1]), -1), fmt)[0]
    rounded = dequantize(q).to(weight.dtype).view_as(weight)
    return rounded + (weight - weight.detach())  # the value of ``rounded``; the gradient also passes straight to w
