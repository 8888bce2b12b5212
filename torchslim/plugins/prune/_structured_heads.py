"""Structured pruning of attention by whole heads: which layers hold heads, a head's score, and the
attention module's head count after a cut.

Two layouts are recognised, both cut through Torch-Pruning's dependency graph, which already couples
the query, key and value rows with the output projection's columns (the attention product is traced
as an element-wise operation):

- timm's fused ``qkv`` Linear under a module with ``num_heads`` (rows: q of every head, then k, then v);
- Hugging Face BERT-style separate ``query``, ``key`` and ``value`` Linears under a module with
  ``num_attention_heads``, ``attention_head_size`` and ``all_head_size`` (``BertSelfAttention``; the
  output projection is the sibling ``BertSelfOutput.dense``, found by the graph).

Head h is rows ``h*head_dim .. (h+1)*head_dim - 1`` of each projection. Pruning channels of such a
group one by one would still run (the forward reshapes to ``(-1, head_dim)``) but would mix the
dimensions of different heads into new ones; whole heads keep every remaining head intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SEPARATE = ("query", "key", "value")
"""Names of the separate projections of a Hugging Face self-attention module."""


@dataclass(frozen=True)
class Heads:
    """An attention module pruned by whole heads, seen from the projection that roots its group."""

    module: nn.Module
    name: str
    """The attention module's name in the model (the key of its figures: a group's root may differ between steps)."""
    count: int
    """Heads it has now."""
    head_dim: int
    fused: int
    """How many of q, k and v the root's rows hold: 3 for timm's ``qkv``, 1 for a separate projection."""


def heads_of(root: nn.Module, names: dict[nn.Module, str]) -> Heads | None:
    """The attention module whose heads the group rooted at ``root`` holds, if any."""
    if not isinstance(root, nn.Linear):
        return None
    parent_name, _, leaf = names.get(root, "").rpartition(".")
    if leaf != "qkv" and leaf not in SEPARATE:
        return None
    parent = next((m for m, n in names.items() if n == parent_name), None)
    if parent is None:
        return None
    return _fused(root, parent, parent_name) if leaf == "qkv" else _separate(parent, parent_name)


def _fused(root: nn.Linear, parent: nn.Module, name: str) -> Heads | None:
    heads = getattr(parent, "num_heads", None)
    if not isinstance(heads, int) or heads < 2 or root.out_features % (3 * heads):
        return None
    head_dim = getattr(parent, "head_dim", root.out_features // (3 * heads))
    if not isinstance(head_dim, int) or root.out_features != 3 * heads * head_dim:
        return None
    return Heads(parent, name, heads, head_dim, 3)


def _separate(parent: nn.Module, name: str) -> Heads | None:
    heads, head_dim = getattr(parent, "num_attention_heads", None), getattr(parent, "attention_head_size", None)
    # One head left (by an earlier stage) is still a head group: it keeps its channels, none are cut one by one.
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads < 1:
        return None
    # All three projections must hold every head (no grouped keys and values, no cross-attention sizes).
    projections = [getattr(parent, attr, None) for attr in SEPARATE]
    if not all(isinstance(p, nn.Linear) and p.out_features == heads * head_dim for p in projections):
        return None
    return Heads(parent, name, heads, head_dim, 1)


def head_scores(heads: Heads, importance: torch.Tensor) -> torch.Tensor | None:
    """One score per head: the mean importance of its channels (of q, k and v where the root fuses them)."""
    scores = importance.detach().float().cpu().flatten()
    if scores.numel() != heads.fused * heads.count * heads.head_dim:
        return None  # not one score per row of the root: the group is left whole
    return scores.view(heads.fused, heads.count, heads.head_dim).mean(dim=(0, 2))


def drop_heads(heads: Heads, kept: torch.Tensor) -> None:
    """Give the attention module its new head count (the projections are already cut), and slice its own
    per-head tensors (timm's relative position biases) to the ``kept`` heads."""
    module: Any = heads.module  # its own attributes, set as plain values
    count = int(kept.numel())
    if heads.fused == 3:
        module.num_heads = count
        if isinstance(getattr(module, "attn_dim", None), int):
            module.attn_dim = count * heads.head_dim
    else:
        # BERT's forward reshapes by attention_head_size alone; the counts are updated so that the
        # module describes itself truly, and so that they are recorded for loading.
        module.num_attention_heads = count
        module.all_head_size = count * heads.head_dim
    for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
        if tensor is None or tensor.dtype in (torch.long, torch.int) or heads.count not in tensor.shape:
            continue
        dim = max(i for i, size in enumerate(tensor.shape) if size == heads.count)
        sliced = torch.index_select(tensor.data, dim, kept.to(tensor.device))
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(sliced, requires_grad=tensor.requires_grad)
        else:
            module._buffers[key] = sliced
