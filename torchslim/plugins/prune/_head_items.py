"""The per-head tensors of a group of whole heads: coupled layers and parameters whose channels are the heads.

A relative position bias table of shape ``[(2W-1)^2, H]``, a position MLP ending in ``H`` outputs (a continuous
position bias), a talking-heads projection ``Linear(H, H)``, a gate of ``H`` values: whatever the attention adds
to or mixes into its scores per head. Torch-Pruning traces the attention product as an element-wise operation,
so it couples these to the query, key and value projections and maps the projections' channel indices onto
them, past their ``H`` entries (scoring them raises IndexError, its check refuses the cut). In a group of whole
heads, a coupled layer or parameter as wide as the head count on the side the group cuts (and not as wide as a
head, where the two are equal nothing is told apart) is per-head: scoring leaves it out, and it is cut by head,
its indices the heads removed.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._structured_heads import Heads


_MEMBERS: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
"""The per-head members of the group of each root, as listed with all its channels: a plan for some heads'
channels may miss some (Torch-Pruning maps no index of those channels onto them)."""


def width(graph: Any, dep: Any) -> int | None:
    """Channels of ``dep``'s target on the side ``dep`` cuts (None for Torch-Pruning's own operations)."""
    target = dep.target
    if type(target.module).__module__.startswith("torch_pruning") or graph.get_pruner_of_module(target.module) is None:
        return None
    try:
        size = graph.get_out_channels(target) if graph.is_out_channel_pruning_fn(dep.handler) else graph.get_in_channels(target)
    except (AttributeError, TypeError):  # a pruner that cannot tell
        return None
    return int(size) if isinstance(size, int) else None


def per_head(graph: Any, dep: Any, heads: Heads) -> bool:
    """Whether ``dep`` cuts a layer or parameter whose channels on that side are the heads themselves."""
    return heads.count != heads.head_dim and width(graph, dep) == heads.count


def scored(graph: Any, group: Any, heads: Heads) -> Any:
    """``group`` (all the root's channels) without its per-head members, for scoring: their indices are not the
    projection's channels. The members are kept for :func:`cut_by_head`."""
    kept = [item for item in group._group if not per_head(graph, item.dep, heads)]
    listed = [*group._group, *getattr(group, "unsound", [])]  # with those _structured_repair left out
    _MEMBERS[group[0].dep.target.module] = [item.dep for item in listed if per_head(graph, item.dep, heads)]
    if len(kept) == len(group._group):
        return group
    copied = copy.copy(group)
    copied._group = kept
    return copied


def cut_by_head(graph: Any, plan: Any, heads: Heads, units: list[int]) -> None:
    """Make ``plan`` (a Torch-Pruning group about to be cut) cut heads ``units`` from every per-head member of
    its root's group."""
    from torch_pruning import _helpers

    removed = sorted(units)
    plan._group = [item for item in plan._group if not per_head(graph, item.dep, heads)]
    for dep in _MEMBERS.get(plan[0].dep.target.module, []):
        item = _helpers.GroupItem(dep=dep, idxs=list(removed))
        item.root_idxs = list(removed)  # as Torch-Pruning's groups hold them: plain indices
        plan._group.append(item)


def mapped_whole(graph: Any, plan: Any, heads: Heads, units: list[int]) -> bool:
    """Whether every Linear layer of ``plan`` cut along the heads' channels loses as many indices as whole heads
    have there (Torch-Pruning's mapping through a permute it does not follow loses some: the plan is then cut
    by heads directly)."""
    from torch import nn

    span = heads.count * heads.head_dim
    for dep, idxs in plan:
        size = width(graph, dep)
        if not isinstance(dep.target.module, nn.Linear) or size is None or per_head(graph, dep, heads):
            continue
        if size % span or len(idxs) != len(units) * heads.head_dim * (size // span) or max(idxs, default=0) >= size:
            return False
    return True
