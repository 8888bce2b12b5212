"""Structured pruning: whole output channels and neurons removed, through torch-pruning's dependency graph.

torch-pruning traces the model and groups the layers whose channels are coupled (a conv and its
BatchNorm, the convs joined by a residual addition, a depthwise conv and the layer feeding it, a
squeeze-excite gate and the features it scales, concatenations). This module ranks the groups'
channels itself, so that a per-layer ceiling, ``round_to`` and global or per-layer ranking behave
as torchslim documents them, and asks torch-pruning only to cut the chosen channels. Its API
stays inside this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._layers import matches

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ChannelOptions:
    """How channels are ranked and how many may go."""

    scope: str
    """``global`` or ``layer``."""
    norm: int
    """1 for L1 importance, 2 for L2."""
    round_to: int
    """Channel counts left are multiples of this (where the layer is large enough)."""
    ceiling: float
    """At most this fraction of any group's original channels is removed."""
    exclude: Sequence[str]
    """Layer name patterns whose channels stay."""


@dataclass
class _Group:
    """One set of coupled channels: the root layer, its channel importances, what may go."""

    name: str
    root: nn.Module
    importance: torch.Tensor
    """One score per unit; a unit is ``per_unit`` channels (grouped convs prune all groups alike)."""
    per_unit: int
    units: int
    removable: int
    """Units that may still be removed in this step without passing the ceiling."""
    remove: int = 0


@dataclass
class ChannelState:
    """What a multi-step structured prune remembers between steps."""

    original: dict[str, int] = field(default_factory=dict)
    """Output channels of each group's root layer (by name) before the first step."""
    protected: list[str] = field(default_factory=list)
    """Layers left alone: the model's output layers and the excluded ones."""


def prune_step(model: nn.Module, example: torch.Tensor, fraction: float, opts: ChannelOptions, state: ChannelState) -> None:
    """Remove channels so that ``fraction`` of the original prunable channels are gone after this step."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {module: name for name, module in model.named_modules()}
    protected = _protected(graph, names, opts.exclude)
    state.protected = sorted(names[m] for m in protected)
    scorer = tp.importance.GroupMagnitudeImportance(p=opts.norm, group_reduction="mean", normalizer="mean")
    groups = [g for g in (_describe(graph, group, names, scorer, opts, state) for group in
                          graph.get_all_groups(ignored_layers=protected, root_module_types=list(ROOT_TYPES))) if g]
    if opts.scope == "global":
        _choose_global(groups, fraction, state)
    else:
        _choose_per_layer(groups, fraction, state)
    for group in groups:
        _round(group, opts.round_to)
        _cut(graph, group)


def pruned_fraction(model: nn.Module, state: ChannelState) -> float:
    """Fraction of the prunable channels (of the groups seen in the first step) removed so far."""
    modules = dict(model.named_modules())
    before = sum(state.original.values())
    after = sum(_out_channels(modules[name]) for name in state.original)
    return 1.0 - after / before if before else 0.0


def _out_channels(module: nn.Module) -> int:
    value: Any = getattr(module, "out_channels", None) or getattr(module, "out_features", 0)
    return int(value)


def _protected(graph: Any, names: dict[nn.Module, str], exclude: Sequence[str]) -> list[nn.Module]:
    outputs: list[nn.Module] = [m for m in graph.module2node
                                if isinstance(m, ROOT_TYPES) and _feeds_output(graph.module2node[m])]
    excluded = [m for m, name in names.items()
                if isinstance(m, ROOT_TYPES) and matches(name, exclude)]
    return outputs + [m for m in excluded if m not in outputs]


def _feeds_output(node: Any) -> bool:
    """Whether the layer's output reaches the model's output without passing another Conv/Linear.

    Tracing starts from the outputs, so a node without successors is an output of the model.
    """
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if not current.outputs:
            return True
        stack.extend(n for n in current.outputs if not isinstance(n.module, ROOT_TYPES))
    return False


def _describe(graph: Any, group: Any, names: dict[nn.Module, str], scorer: Any, opts: ChannelOptions,
              state: ChannelState) -> _Group | None:
    root = group[0].dep.target.module
    importance = scorer(group)
    if importance is None or root not in names:
        return None
    per_unit = _channel_groups(graph, group)
    units = int(importance.numel()) // per_unit
    if per_unit > 1:
        importance = importance.view(per_unit, units).mean(dim=0)
    name = names[root]
    original = state.original.setdefault(name, units * per_unit) // per_unit
    removable = max(0, int(opts.ceiling * original) - (original - units))
    return _Group(name, root, importance.detach().float().cpu(), per_unit, units, min(removable, units - 1))


def _channel_groups(graph: Any, group: Any) -> int:
    # A grouped (not depthwise) conv, or a GroupNorm, needs the same channels removed from each
    # of its groups: rank "units" of one channel per group instead of single channels.
    counts = [1]
    for dep, _ in group:
        module, handler = dep.target.module, dep.handler
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or not isinstance(module, nn.Module):
            continue
        if graph.is_out_channel_pruning_fn(handler):
            counts.append(int(pruner.get_out_channel_groups(module)))
        elif graph.is_in_channel_pruning_fn(handler):
            counts.append(int(pruner.get_in_channel_groups(module)))
    return max(counts)


def _choose_per_layer(groups: list[_Group], fraction: float, state: ChannelState) -> None:
    for group in groups:
        original = state.original[group.name] // group.per_unit
        target = int(fraction * original + 0.5) - (original - group.units)
        group.remove = max(0, min(target, group.removable))


def _choose_global(groups: list[_Group], fraction: float, state: ChannelState) -> None:
    """Rank every group's candidate units together; each group offers only the units its ceiling allows."""
    original = sum(state.original[g.name] for g in groups)
    current = sum(g.units * g.per_unit for g in groups)
    budget = int(fraction * original + 0.5) - (original - current)
    candidates = [(float(score), index) for index, g in enumerate(groups)
                  for score in torch.sort(g.importance).values[: g.removable].tolist()]
    for _, index in sorted(candidates):
        group = groups[index]
        if budget < group.per_unit:
            break
        group.remove += 1
        budget -= group.per_unit


def _round(group: _Group, round_to: int) -> None:
    """Move the channel count left to the nearest multiple of ``round_to``, within the ceiling."""
    if round_to <= 1 or group.per_unit > 1 or group.units <= round_to:
        return
    least = group.units - group.removable
    kept = int((group.units - group.remove) / round_to + 0.5) * round_to
    if kept < least:
        kept = -(-least // round_to) * round_to
    group.remove = group.units - min(max(kept, round_to), group.units)


def _cut(graph: Any, group: _Group) -> None:
    if group.remove <= 0:
        return
    units = torch.argsort(group.importance)[: group.remove].tolist()
    channels = sorted(u + k * group.units for u in units for k in range(group.per_unit))
    pruner = graph.get_pruner_of_module(group.root)
    plan = graph.get_pruning_group(group.root, pruner.prune_out_channels, channels)
    if graph.check_pruning_group(plan):
        plan.prune()
