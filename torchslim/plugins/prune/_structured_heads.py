"""Structured pruning of attention by whole heads: which layers hold heads, a head's score, and the
attention module's head count after a cut.

Heads are found from the graph (``_head_split``): a Linear layer whose output the model reshapes into
``(..., [k,] H, d)`` on its way to an attention product roots a group of ``H`` heads (timm's fused ``qkv``,
Hugging Face BERT's separate ``query``/``key``/``value``, a cross-covariance attention whose heads attend
over channels, a user's own einsum attention alike). The cut goes through Torch-Pruning's dependency
graph, which couples the query, key and value rows with the output projection's columns (the attention
product is traced as an element-wise operation); where its index mapping loses the heads (a permute it
maps wrongly), the Linear layers of its plan are cut by whole heads directly (:func:`cuts_by_heads`).
PyTorch's ``nn.MultiheadAttention``, whose projections are parameters and not Linear layers, is cut by
``_mha`` instead.

Head h is rows ``b*H*d + h*d .. b*H*d + (h+1)*d - 1`` of each block b of the root. Pruning channels of such
a group one by one would still run (the forward reshapes to ``(-1, head_dim)``) but would mix the
dimensions of different heads into new ones; whole heads keep every remaining head intact.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _mha
from ._head_dims import find_tied
from ._head_items import per_head
from ._head_split import Split, find_splits

if TYPE_CHECKING:
    from ._structured import ChannelState, _Group

_FOUND: weakref.WeakKeyDictionary[nn.Module, Split] = weakref.WeakKeyDictionary()
"""The last :func:`prepare`'s head splits, by projection (weak: a pruned model's layers are not kept alive)."""


def prepare(model: nn.Module, example: torch.Tensor) -> dict[type, Any]:
    """Find ``model``'s attention heads from one forward on ``example`` (for :func:`heads_of`), and return the
    Torch-Pruning pruners its ``nn.MultiheadAttention`` layers need (by class) for the dependency graph."""
    for module in model.modules():
        _FOUND.pop(module, None)  # a split the model no longer makes is no longer a head group
    splits = find_splits(model, example)
    for layer, split in splits.items():
        _FOUND[layer] = split
    find_tied(model, example, splits)  # heads as wide as their input and tied to it (_head_dims)
    return _mha.residual_pruners(model)


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
    own: bool = False
    """The module is an ``nn.MultiheadAttention``, its own root: cut by ``_mha``, not by Torch-Pruning."""
    inputs: int = 0
    """The root's input width (an attribute equal to it may be the module's input width, not its heads')."""


def heads_of(root: nn.Module, names: dict[nn.Module, str]) -> Heads | None:
    """The attention module whose heads the group rooted at ``root`` holds, if any."""
    if _mha.prunable(root):
        layer: Any = root
        return Heads(root, names.get(root, ""), layer.num_heads, layer.head_dim, 3, own=True)
    split = _FOUND.get(root)
    if split is None or not isinstance(root, nn.Linear) or split.owner not in names:
        return None
    if root.out_features != split.fused * split.count * split.head_dim:
        return None  # cut since it was found: found again at the next trace
    return Heads(split.owner, names[split.owner], split.count, split.head_dim, split.fused, inputs=root.in_features)


def attention_groups(names: dict[nn.Module, str], opts: Any, state: ChannelState) -> list[_Group]:
    """A group of whole heads for each ``nn.MultiheadAttention`` among ``names`` (the model's modules) not
    excluded (Torch-Pruning's graph does not see its heads), scored by the weight norms of their rows and
    output columns."""
    from .._layers import matches
    from ._structured import _describe_heads

    groups = []
    for module, name in names.items():
        heads = heads_of(module, names) if _mha.prunable(module) else None
        if heads is not None and not matches(name, opts.exclude) and name not in state.skipped:
            scores = _mha.row_importance(heads.module, opts.norm)  # type: ignore[arg-type]
            group = _describe_heads(name, module, heads, scores, opts, state)
            groups += [group] if group is not None else []
    return groups


@dataclass(frozen=True)
class HeadCut:
    """One Linear layer of an attention group cut by whole heads: rows (``out``) or columns."""

    layer: nn.Linear
    out: bool
    index: list[int]


def head_rows(heads: Heads, units: list[int], blocks: int, size: int = 0) -> list[int]:
    """Rows (or columns) of ``units`` heads in each of ``blocks`` blocks of ``count * size`` (``size``: the
    heads' ``head_dim`` unless given: an output projection may read fewer values per head than the root holds)."""
    size = size or heads.head_dim
    width = heads.count * size
    return sorted(b * width + u * size + j for b in range(blocks) for u in units for j in range(size))


def keeps_heads(graph: Any, plan: Any, root: nn.Module, heads: Heads, units: list[int]) -> bool:
    """Whether Torch-Pruning's ``plan`` cuts exactly the root's rows of ``units`` whole heads (in every block),
    and no Linear layer's inputs of another width per head (whose columns its index mapping cannot place)."""
    width = heads.count * heads.head_dim
    if any(
        isinstance(dep.target.module, nn.Linear)
        and graph.is_in_channel_pruning_fn(dep.handler)
        and dep.target.module.in_features % width
        for dep, _ in plan
    ):
        return False
    for dep, idxs in plan:
        if dep.target.module is root and graph.is_out_channel_pruning_fn(dep.handler):
            return sorted(int(i) for i in idxs) == head_rows(heads, units, heads.fused)
    return False


def cuts_by_heads(graph: Any, plan: Any, heads: Heads, units: list[int]) -> list[HeadCut] | None:
    """The Linear layers of Torch-Pruning's ``plan``, each cut by whole heads, where its index mapping lost them
    (a reshape and permute it maps wrongly, as XCiT's): the projections' rows of ``units`` heads in each block,
    the output projection's columns. None if the plan holds another layer, or a layer not that wide."""
    width, cuts = heads.count * heads.head_dim, []
    for dep, _ in plan:
        module = dep.target.module
        if type(module).__module__.startswith("torch_pruning"):
            continue  # Torch-Pruning's own stand-ins for reshapes, permutes and element-wise operations
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, nn.Linear) and per_head(graph, dep, heads):  # its channels are the heads (_head_items)
            cuts.append(HeadCut(module, out, sorted(units)))
            continue
        size = getattr(module, "out_features" if out else "in_features", 0)
        if not isinstance(module, nn.Linear) or size % (width if out else heads.count):
            return None
        # an output projection's columns: the heads' values, as many per head as its width says
        index = head_rows(heads, units, size // width) if out else head_rows(heads, units, 1, size // heads.count)
        cuts.append(HeadCut(module, out, index))
    return cuts


def head_scores(heads: Heads, importance: torch.Tensor) -> torch.Tensor | None:
    """One score per head: the mean importance of its channels (of q, k and v where the root fuses them)."""
    scores = importance.detach().float().cpu().flatten()
    if scores.numel() != heads.fused * heads.count * heads.head_dim:
        return None  # not one score per row of the root: the group is left whole
    return scores.view(heads.fused, heads.count, heads.head_dim).mean(dim=(0, 2))


def value_widths(heads: Heads, cuts: list[HeadCut] | None) -> set[int]:
    """Per-head widths of the projections whose columns ``cuts`` cut, other than the heads' own (TinyViT's
    heads hold a key, a query and a value four times as wide in one block; its projection reads the values)."""
    return {cut.layer.in_features // heads.count for cut in cuts or [] if not cut.out} - {heads.head_dim}


def drop_heads(heads: Heads, kept: torch.Tensor, widths: set[int] | None = None) -> None:
    """Give the attention module its new head count (the projections are already cut), and slice its own
    per-head tensors (timm's relative position biases, XCiT's temperatures) to the ``kept`` heads.

    The count is found generically: the module's integer attributes equal to its head count become the
    new count, those equal to the heads' total width the new width (BERT's ``all_head_size``, timm's
    ``attn_dim``). Names break ties only: where the count equals the head width, attributes named for a
    size or dimension are taken as the width; where several attributes hold the count, those named for
    heads are preferred; where the heads' width equals the module's input width, only attributes named for
    heads or attention are taken as the heads' width (Swin's ``dim`` is its input's)."""
    module: Any = heads.module  # its own attributes, set as plain values
    count = int(kept.numel())
    for key, value in _count_attributes(module, heads).items():
        setattr(module, key, count if value == heads.count else count * heads.head_dim)
    for key, value in _value_attributes(module, heads, widths or set()).items():
        setattr(module, key, count * (value // heads.count))
    for key, value in vars(module).items():  # the module's caches of per-head tensors computed before the cut
        if (
            not key.startswith("_")
            and isinstance(value, dict)
            and any(isinstance(v, torch.Tensor) and heads.count in v.shape for v in value.values())
        ):
            value.clear()
    for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
        if tensor is None or tensor.dtype in (torch.long, torch.int) or heads.count not in tensor.shape:
            continue
        dim = max(i for i, size in enumerate(tensor.shape) if size == heads.count)
        sliced = torch.index_select(tensor.data, dim, kept.to(tensor.device))
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(sliced, requires_grad=tensor.requires_grad)
        else:
            module._buffers[key] = sliced


def _count_attributes(module: nn.Module, heads: Heads) -> dict[str, int]:
    """The module's attributes that hold its head count or its heads' total width."""
    plain = {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}
    width = heads.count * heads.head_dim
    counts = {
        k: v for k, v in plain.items() if v == heads.count and not (heads.count == heads.head_dim and ("dim" in k or "size" in k))
    }
    named = {k: v for k, v in counts.items() if "head" in k}
    widths = {
        k: v
        for k, v in plain.items()
        if v == width and width != heads.count and (width != heads.inputs or "head" in k or "att" in k)
    }
    return {**(named if len(counts) > 1 and named else counts), **widths}


def _value_attributes(module: nn.Module, heads: Heads, widths: set[int]) -> dict[str, int]:
    """The module's attributes that hold its projection's input width, ``count`` heads of one of ``widths`` values
    (where that equals the module's input width, only those named for an output, heads or attention)."""
    totals = {heads.count * w for w in widths}
    return {
        k: v
        for k, v in vars(module).items()
        if type(v) is int
        and not k.startswith("_")
        and v in totals
        and (v != heads.inputs or any(word in k for word in ("out", "head", "att")))
    }
