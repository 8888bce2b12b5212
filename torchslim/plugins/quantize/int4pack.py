"""torch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``) for 4-bit ``kbit`` Linear layers.

The kernel takes bfloat16 activations (with float32 ones it was far slower than float32 everywhere
measured, bench/lowbit_kernels.py) and weights in its own packed layout, which is built from the
stored codes and scales when the layer first runs: the file keeps torchslim's plain tensors, so it
loads with ``weights_only=True``. The kernel computes ``w = (q - 8) * scale + offset`` per group of
32, 64, 128 or 256 input features; torchslim's ``w = (q - zero) * scale`` becomes
``offset = (8 - zero) * scale``, and a per-channel scale is repeated over the groups of its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .formats import Format, QWeight

#: The group sizes the CPU kernel takes (torch 2.13: "expect qGroupSize to be 32, 64, 128 or 256").
KERNEL_GROUPS = (32, 64, 128, 256)
#: The kernel packs output rows in tiles of this many ("expect N to be dividable by 16").
ROW_TILE = 16


def available() -> bool:
    """Whether this torch has the int4 CPU kernel and its packing op."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def kernel_group(fmt: Format, features: int) -> int | None:
    """The kernel's group size for ``fmt`` over ``features`` inputs, or None if it has none: a ``group_size``
    the kernel takes, or (per channel) the largest kernel group dividing ``features``."""
    if fmt.group_size:
        return fmt.group_size if fmt.group_size in KERNEL_GROUPS else None
    return next((g for g in reversed(KERNEL_GROUPS) if features % g == 0), None)


def unsupported(layer: nn.Module, fmt: Format) -> str | None:
    """Why the kernel cannot compute ``layer`` (a Linear or its packed layer) in ``fmt``, or None."""
    if not available():
        return f"torch {torch.__version__.split('+')[0]} has no int4 CPU kernel"
    if not hasattr(layer, "in_features"):
        return "a convolution (the kernel is a matrix product)"
    if fmt.kind != "int" or fmt.bits != 4:
        return f"{fmt.describe()} is not 4-bit"
    features, out = int(getattr(layer, "in_features")), int(getattr(layer, "out_features"))  # noqa: B009 (typed Any)
    if out % ROW_TILE:
        return f"out_features {out} is not a multiple of {ROW_TILE}"
    if kernel_group(fmt, features) is None:
        groups = "group_size " + str(fmt.group_size) if fmt.group_size else f"in_features {features}"
        return f"{groups} fits no kernel group ({', '.join(map(str, KERNEL_GROUPS))})"
    return None


@dataclass(frozen=True)
class Int4Weight:
    """A weight in the kernel's layout: packed codes, group size, bfloat16 scales and offsets (groups x out x 2)."""

    packed: torch.Tensor
    group: int
    scale_offset: torch.Tensor

    @classmethod
    def of(cls, q: QWeight, fmt: Format) -> Int4Weight:
        """The kernel's layout of the 4-bit ``q`` (codes out x in)."""
        features = q.codes.shape[1]
        group = kernel_group(fmt, features)
        if group is None:
            raise ValueError(f"no int4 kernel group for {fmt.describe()} over {features} features")
        scale = q.scale.float()
        zero = q.zero.float() if isinstance(q.zero, torch.Tensor) else torch.full_like(scale, q.zero)
        repeat = features // group // scale.shape[1]  # a per-channel scale covers every group of its row
        scale, offset = scale.repeat_interleave(repeat, 1), ((8 - zero) * scale).repeat_interleave(repeat, 1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32).contiguous(), 1)
        return cls(packed, group, torch.stack([scale, offset], 2).transpose(0, 1).contiguous().bfloat16())

    def linear(self, inputs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` computed by the kernel in bfloat16; the output cast back to the inputs' dtype."""
        rows = inputs.reshape(-1, inputs.shape[-1]).to(torch.bfloat16).contiguous()
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scale_offset)
        out = out.to(inputs.dtype).view(*inputs.shape[:-1], -1)
        return out + bias if bias is not None else out
