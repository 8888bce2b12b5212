"""Structured pruning, the cut side: Torch-Pruning's plan for a group's chosen channels (checked before
the choice and again before the cut), the cut itself, undone when the model's forward then fails;
an attention layer pruned by whole heads gets its new head count (``_structured_heads``); an
``nn.MultiheadAttention``'s heads are cut by ``_mha``, and any such layer left with heads not as wide as its
embedding gets the forward that reads them (``_mha.settle``); attention whose heads are tied to the channels
a group cuts loses head dimensions in the same cut (``_head_dims``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...engine.errors import first_line
from . import _head_dims as head_dims
from . import _mha
from . import _structured_functional as functional
from . import _structured_slices as slices
from ._head_items import cut_by_head, mapped_whole
from ._structured_data import Lost, Removal, record_cut, removed_by
from ._structured_heads import HeadCut, cuts_by_heads, drop_heads, keeps_heads, value_widths
from ._structured_layers import prune_plan
from ._structured_repair import check_sound, sound

if TYPE_CHECKING:
    from ._structured import ChannelState, _Group


def _precheck(graph: Any, group: _Group) -> str | None:
    """Why Torch-Pruning cannot cut even the least important unit of this group (None: it can)."""
    if group.removable <= 0 or (group.heads is not None and group.heads.own):
        return None
    return _checked_plan(graph, group, 1, "it")[1]


def _checked_plan(graph: Any, group: _Group, count: int, what: str) -> tuple[Any, str | None]:
    """Torch-Pruning's plan for cutting ``count`` units and None, or None and why there is no such plan."""
    try:
        plan = _plan(graph, group, count)
        if not check_sound(graph, plan):
            return None, f"Torch-Pruning's check refused {what} (a coupled layer would lose all its channels)"
    except Exception as exc:
        return None, f"building its pruning plan raised {first_line(exc, typed=True, limit=200)}"
    return plan, None


def _channels(group: _Group, count: int) -> list[int]:
    """Output channels of the root layer for the ``count`` least important units."""
    units = torch.argsort(group.importance)[:count].tolist()
    if group.heads is not None:  # the root's channels of whole heads (q of a fused qkv); the graph adds the rest
        size = group.heads.head_dim
        return sorted(u * size + d for u in units for d in range(size))
    return sorted(u + k * group.units for u in units for k in range(group.per_unit))


def _plan(graph: Any, group: _Group, count: int) -> Any:
    """Torch-Pruning's plan for cutting ``count`` units; for heads, without the attention's own per-head
    tensors (relative position biases), which ``drop_heads`` slices by head, not by channel. A plan of channels is
    made sound (``_structured_repair``); one of heads is kept whole, for ``cuts_by_heads`` to place its columns."""
    plan = graph.get_pruning_group(group.root, graph.get_pruner_of_module(group.root).prune_out_channels, _channels(group, count))
    if group.heads is None:
        return sound(graph, plan)
    cut_by_head(graph, plan, group.heads, torch.argsort(group.importance)[:count].tolist())  # _head_items
    own = {id(t) for t in group.heads.module._parameters.values() if t is not None}
    plan._group = [item for item in plan._group if id(item.dep.target.module) not in own]
    return plan


@dataclass
class Pending:
    """One group's cut, planned and not made yet."""

    group: _Group
    plan: Any
    """Torch-Pruning's plan, the layers cut by whole heads (a list of ``HeadCut``), or None (an
    ``nn.MultiheadAttention``'s own heads)."""
    removed: dict[nn.Module, Removal]
    dims: Any
    """The head dimensions removed from attention tied to the cut channels (``_head_dims``)."""


def planned(graph: Any, group: _Group, state: ChannelState) -> Pending | None:
    """The group's cut of its chosen units, planned; None where nothing is to be cut, or where it cannot be
    (why is named in ``state.skipped``)."""
    if group.remove <= 0:
        return None
    plan, problem = (
        (None, None) if group.heads is not None and group.heads.own else _checked_plan(graph, group, group.remove, "the cut")
    )
    cuts = _head_cuts(graph, plan, group)
    if problem is None and cuts is not None and not cuts:
        problem = "Torch-Pruning's plan does not keep its heads whole and holds layers other than the projections"
    if problem is not None:
        state.skipped.setdefault(group.name, problem)
        return None
    removed = _removals(cuts) if cuts else removed_by(plan) if plan is not None else {}
    dims = head_dims.choose(group.tied, group.remove)  # before the plan narrows the projections' inputs
    head_dims.add_removals(dims, removed)
    return Pending(group, plan if cuts is None else cuts, removed, dims)


def make(model: nn.Module, graph: Any, pending: Pending) -> None:
    """Make a planned cut (unchecked)."""
    _apply(model, graph, pending.plan, pending.group)
    head_dims.apply(pending.dims)


def commit(pending: Pending, state: ChannelState, lost: dict[nn.Module, Lost]) -> None:
    """Keep a cut whose forward was checked: what it took from Linear layers (for the refit), the heads it removed."""
    record_cut(lost, pending.removed)
    group = pending.group
    if group.heads is not None:
        state.heads[group.heads.name] = state.heads.get(group.heads.name, 0) + group.remove


def _cut(
    model: nn.Module,
    graph: Any,
    group: _Group,
    forward: Callable[[], Any],
    expected: Any,
    state: ChannelState,
    lost: dict[nn.Module, Lost],
) -> bool:
    """Cut the chosen units; undo the cut (and leave the group whole) if the model's ``forward`` (the shapes of
    its outputs on the example and on inputs that take other branches) then fails or differs from ``expected``.
    What a successful cut took from Linear layers is folded into ``lost`` (for the refit). Returns whether
    the cut was undone."""
    pending = planned(graph, group, state)
    if pending is None:
        return False
    saved = save(model, graph)
    try:
        make(model, graph, pending)
        got = forward()
        if got != expected:
            raise RuntimeError(f"output shape changed from {expected} to {got}")
    except Exception as exc:
        undo(model, saved)
        state.skipped.setdefault(group.name, f"the pruned forward failed ({first_line(exc, typed=True, limit=200)}); cut undone")
        return True
    commit(pending, state, lost)
    return False


def _head_cuts(graph: Any, plan: Any, group: _Group) -> list[HeadCut] | None:
    """Where Torch-Pruning's plan for a group of heads does not cut them whole: its layers cut by whole heads
    (an empty list where that cannot be done either); None where the plan runs as it is."""
    if plan is None or group.heads is None:
        return None
    units = torch.argsort(group.importance)[: group.remove].tolist()
    if keeps_heads(graph, plan, group.root, group.heads, units) and mapped_whole(graph, plan, group.heads, units):
        return None
    return cuts_by_heads(graph, plan, group.heads, units) or []


def _removals(cuts: list[HeadCut]) -> dict[nn.Module, Removal]:
    """What ``cuts`` remove from each Linear layer, as ``removed_by`` reads it from a plan (for the refit)."""
    removed: dict[nn.Module, Removal] = {}
    for cut in cuts:
        entry = removed.setdefault(cut.layer, Removal((cut.layer.in_features, cut.layer.out_features), set(), set()))
        (entry.outs if cut.out else entry.ins).update(cut.index)
    return removed


def _apply(model: nn.Module, graph: Any, plan: Any, group: _Group) -> None:
    """Cut: Torch-Pruning's plan (or its layers cut by whole heads), then the heads' module's own count; or
    an ``nn.MultiheadAttention``'s heads."""
    import torch_pruning as tp

    kept = torch.sort(torch.argsort(group.importance)[group.remove :]).values
    widths = value_widths(group.heads, plan) if group.heads is not None and isinstance(plan, list) else set()
    if isinstance(plan, list):
        for cut in plan:
            (tp.prune_linear_out_channels if cut.out else tp.prune_linear_in_channels)(cut.layer, cut.index)
            if cut.out:
                functional.cut_pieces(cut.layer, cut.index)
    elif plan is not None:
        biases = functional.pending(graph, plan)  # a functional call's bias built from tensors of the model
        prune_plan(graph, plan)  # the plan, and the cut layers' own per-channel tensors it left whole
        for layer, removed in biases:
            functional.cut_pieces(layer, removed)
    if group.heads is not None and not group.heads.own:
        drop_heads(group.heads, kept, widths)
    elif group.heads is not None:
        _mha.cut_heads(group.heads.module, kept)  # type: ignore[arg-type]
    _mha.settle(model)


def _shapes_of(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (list, tuple)):
        return tuple(_shapes_of(o) for o in output)
    if isinstance(output, dict):
        return tuple((k, _shapes_of(v)) for k, v in output.items())
    return None


Saved = tuple[
    list[tuple[nn.Module, type, dict[str, Any], dict[str, Any], dict[str, Any]]],
    list[tuple[Any, torch.Tensor]],
    list[tuple[list[Any], list[Any]]],
    Any,
]


def save(model: nn.Module, graph: Any = None) -> Saved:
    """What cuts may change, by reference (no tensor is copied): module classes and attributes (the model's, and
    the graph's own nodes', which hold the sizes of the concatenations and splits), parameters' data, the contents
    of the lists modules hold (an ``nn.LSTM`` updates its ``_flat_weights`` in place when a weight is replaced:
    restoring the list object alone would leave the cut weights in it), and the index mappings of ``graph`` (None: none)."""
    own = list(model.modules())
    known = {id(m) for m in own}
    graph_nodes = [] if graph is None else list(graph.module2node.values())
    nodes = [n.module for n in graph_nodes if isinstance(n.module, nn.Module) and id(n.module) not in known]
    modules = [(m, type(m), dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in own + nodes]
    lists = [(v, list(v)) for m in own for v in vars(m).values() if isinstance(v, list)]
    deps = [dep for node in graph_nodes for dep in node.dependencies]
    lists += [(dep.index_mapping, list(dep.index_mapping)) for dep in deps if isinstance(dep.index_mapping, list)]
    mappings = [(dep, dep.index_mapping) for dep in deps]
    recorded = {} if graph is None else slices.remembered(graph)
    # a cut nn.Parameter is replaced, and the graph re-keyed by the new one (Torch-Pruning's Group.prune)
    keys = None if graph is None else (dict(graph.module2node), dict(graph._param_to_name), [(n, n.module) for n in graph_nodes])
    return modules, [(p, p.data) for p in model.parameters()], lists, (graph, mappings, recorded, keys)


def undo(model: nn.Module, saved: Saved) -> None:
    """Put back what :func:`save` saved, and the forward of the ``nn.MultiheadAttention`` layers as they are again."""
    modules, data, lists, (graph, mappings, recorded, keys) = saved
    for module, cls, attributes, parameters, buffers in modules:
        module.__class__ = cls
        module.__dict__.clear()
        module.__dict__.update(attributes, _parameters=dict(parameters), _buffers=dict(buffers))
    for parameter, tensor in data:
        parameter.data = tensor
    for held, contents in lists:
        held[:] = contents
    for dep, mapping in mappings:
        dep.index_mapping = mapping
    if graph is not None:
        slices.recall(graph, recorded)
        graph.module2node, graph._param_to_name = keys[0], keys[1]
        for node, module in keys[2]:
            node.module = module
    _mha.settle(model)
