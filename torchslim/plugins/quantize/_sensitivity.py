"""Which layers int8 hurts most: each candidate quantized alone, its effect on the model's output measured.

Used by ``quantize`` with ``skip_sensitive: N`` to leave the N most sensitive layers float
(mixed precision). The measure is the relative L2 distance between the model's output with
one layer quantized and the float model's output, averaged over calibration batches: a
layer-local error would miss that some layers' errors are amplified downstream and others are
washed out by the layers after them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Sensitivity:
    """One layer's effect on the output when it alone is quantized."""

    name: str
    error: float
    """Mean over the batches of ||output_quantized - output_float|| / ||output_float||."""


def rank_layers(
    model: nn.Module, names: Sequence[str], quantize_one: Callable[[nn.Module, str], nn.Module], batches: Sequence[torch.Tensor]
) -> list[Sensitivity]:
    """``names`` ranked by the output error of quantizing each alone, largest first.

    ``quantize_one(model, name)`` returns a copy of ``model`` with only ``name`` quantized.
    """
    if not batches:
        raise ValueError("the calibration data yielded no batch")
    with torch.inference_mode():
        reference = [_output(model, inputs) for inputs in batches]
        ranked = [Sensitivity(name, _error(quantize_one(model, name), batches, reference)) for name in names]
    return sorted(ranked, key=lambda s: s.error, reverse=True)


def ranking_note(ranked: Sequence[Sensitivity], count: int, batches: int) -> str:
    """What a note says about the ``count`` layers left float, and the next one, from ``ranked`` (longer than ``count``)."""
    chosen = ", ".join(f"{s.name} {s.error:.2%}" for s in ranked[:count])
    following = ranked[count]
    return (
        f"left float the {count} layer(s) int8 hurts most on {batches} calibration batch(es) "
        f"(output error when quantized alone): {chosen}; the next: {following.name} {following.error:.2%}"
    )


def _error(model: nn.Module, batches: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    errors = [
        float((_output(model, inputs) - ref).norm() / ref.norm().clamp(min=1e-12))
        for inputs, ref in zip(batches, reference, strict=True)
    ]
    return sum(errors) / len(errors)


def _output(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"skip_sensitive compares the model's outputs and needs a tensor, but the model returned {type(out).__name__}"
        )
    return out.float()
