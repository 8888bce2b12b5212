"""N:M semi-structured sparsity: in every ``m`` consecutive weights along the input dimension, at most ``n`` are non-zero.

For a Linear weight ``(out, in)`` the groups run along ``in``; for a conv weight
``(out, in/groups, kh, kw)`` they run along the input channels at each kernel position (the
layout sparse tensor cores expect: channels last). A layer whose input dimension is not a
multiple of ``m`` (a first conv on one channel, a depthwise conv) cannot follow the pattern.
"""

from __future__ import annotations

import torch


def fits(weight: torch.Tensor, m: int) -> bool:
    """Whether ``weight`` (Linear or conv) can be cut into groups of ``m`` along its input dimension."""
    return weight.dim() >= 2 and weight.shape[1] % m == 0


def nm_mask(weight: torch.Tensor, keep: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` largest-magnitude weights of every group of ``m``."""
    moved = weight.detach().movedim(1, -1)
    groups = moved.abs().reshape(-1, m)
    top = torch.topk(groups, keep, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    return mask.reshape(moved.shape).movedim(-1, 1)
