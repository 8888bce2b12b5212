"""Structured pruning: whole output channels and neurons removed, through torch-pruning's dependency graph.

torch-pruning traces the model and groups the layers whose channels are coupled (a conv and its
BatchNorm, the convs joined by a residual addition, a depthwise conv and the layer feeding it, a
squeeze-excite gate and the features it scales, concatenations). This module ranks the groups'
channels itself, so that a per-layer ceiling, ``round_to`` and global or per-layer ranking behave
as torchslim documents them, and asks torch-pruning only to cut the chosen channels. Its API
stays inside this module and the three beside it: ``_structured_graph`` (the dependency graph and its
groups), ``_structured_choice`` (how many channels each group gives up), ``_structured_cut`` (the
cut, undone if the forward breaks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._structured_choice import _choose_global, _choose_per_layer, _out_channels, _round
from ._structured_cut import _cut, _precheck, _shapes_of
from ._structured_graph import (
    GraphTimeout,
    _all_groups,
    _attention_of,
    _build_graph,
    _channel_groups,
    _deadline,
    _first_line,
    _protected,
)


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
    heads: Any = None
    """The attention module whose heads are this group's units (``num_heads`` is updated), or None."""
    head_dim: int = 0


@dataclass
class ChannelState:
    """What a multi-step structured prune remembers between steps."""

    original: dict[str, int] = field(default_factory=dict)
    """Output channels of each group's root layer (by name) before the first step."""
    protected: list[str] = field(default_factory=list)
    """Layers left alone: the model's output layers and the excluded ones."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Groups left whole (by root layer name) and why: Torch-Pruning's check refused them, scoring or
    cutting them raised, or the pruned model's forward broke (the cut is undone)."""
    heads: dict[str, int] = field(default_factory=dict)
    """Attention modules pruned by whole heads: heads removed so far."""


def prune_step(model: nn.Module, example: torch.Tensor, fraction: float, opts: ChannelOptions, state: ChannelState,
               log: logging.Logger | None = None, time_limit: float | None = None) -> None:
    """Remove channels so that ``fraction`` of the original prunable channels are gone after this step.

    A group that Torch-Pruning refuses (its check fails, scoring or cutting it raises) or whose cut
    breaks the model's forward is left whole and named in ``state.skipped``; under global scope its
    share of the budget goes to the other groups. Attention layers (a module with ``num_heads`` and
    a ``qkv`` Linear, as in timm) are pruned by whole heads.
    """
    log = log or logging.getLogger("torchslim")
    for _ in range(3):  # a cut undone after the choice: trace again and give its share to the others
        undone = _prune_pass(model, example, fraction, opts, state, log, time_limit)
        if not undone or opts.scope != "global":
            return
        log.info("  structured: %d cut(s) undone; giving their share to the other groups", undone)


def _prune_pass(model: nn.Module, example: torch.Tensor, fraction: float, opts: ChannelOptions, state: ChannelState,
                log: logging.Logger, time_limit: float | None) -> int:
    """One trace, choice and cut; returns how many chosen cuts were refused or undone."""
    with _deadline(time_limit):  # Torch-Pruning can spend minutes both tracing and listing the groups
        graph, groups = _graph_and_groups(model, example, opts, state, log, time_limit)
    modules = dict(model.named_modules())
    if opts.scope == "global":
        _choose_global(groups, fraction, state, modules)
    else:
        _choose_per_layer(groups, fraction, state)
    started = time.monotonic()
    with torch.no_grad():
        expected = _shapes_of(model(example))
    before = len(state.skipped)
    for group in groups:
        _round(group, opts.round_to)
        _cut(model, graph, group, example, expected, state)
    log.info("  structured: cut %d groups in %.1f s (%d left whole)", len(groups), time.monotonic() - started,
             len(state.skipped))
    return len(state.skipped) - before


def _graph_and_groups(model: nn.Module, example: torch.Tensor, opts: ChannelOptions, state: ChannelState,
                      log: logging.Logger, time_limit: float | None) -> tuple[Any, list[_Group]]:
    import torch_pruning as tp

    graph = _build_graph(model, example, log, time_limit)
    names = {module: name for name, module in model.named_modules()}
    protected = _protected(graph, names, opts.exclude)
    state.protected = sorted(names[m] for m in protected)
    scorer = tp.importance.GroupMagnitudeImportance(p=opts.norm, group_reduction="mean", normalizer="mean")
    groups = []
    for group in _all_groups(graph, protected, state):
        root = group[0].dep.target.module
        name = names.get(root, type(root).__name__)
        if name in state.skipped:
            continue
        try:
            described = _describe(graph, group, names, scorer, opts, state)
        except GraphTimeout:
            raise
        except Exception as exc:
            _skip(state, name, root, f"scoring raised {_first_line(exc)}")
            continue
        if described is None:
            continue
        problem = _precheck(graph, described)
        if problem:
            _skip(state, name, root, problem)
            continue
        groups.append(described)
    log.info("  structured: %d groups listed and scored", len(groups))
    return graph, groups


def _skip(state: ChannelState, name: str, root: nn.Module, reason: str) -> None:
    state.skipped.setdefault(name, reason)
    state.original.setdefault(name, _out_channels(root))


def pruned_fraction(model: nn.Module, state: ChannelState) -> float:
    """Fraction of the prunable channels (of the groups seen in the first step) removed so far."""
    modules = dict(model.named_modules())
    before = sum(state.original.values())
    after = sum(_out_channels(modules[name]) for name in state.original)
    return 1.0 - after / before if before else 0.0


def nothing_removed(state: ChannelState) -> str:
    """Why a structured prune removed no channel at all: the groups left whole and why (a cut that broke
    the model's forward names the exception's first line), and the output or excluded layers left alone."""
    left_alone = ", ".join(state.protected) or "none"
    if not state.skipped:
        return (f"no channel could be removed: every prunable layer is an output layer or excluded "
                f"(left alone: {left_alone})")
    whole = "; ".join(f"{name}: {reason}" for name, reason in state.skipped.items())
    return (f"no channel could be removed: {len(state.skipped)} group(s) of coupled channels left whole ({whole}); "
            f"output or excluded layers left alone: {left_alone}")


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
    attention = _attention_of(root, names)
    if attention is not None and per_unit == 1:
        return _describe_heads(name, root, attention, importance, opts, state)
    original = state.original.setdefault(name, units * per_unit) // per_unit
    removable = max(0, int(opts.ceiling * original) - (original - units))
    return _Group(name, root, importance.detach().float().cpu(), per_unit, units, min(removable, units - 1))


def _describe_heads(name: str, root: Any, attention: Any, importance: torch.Tensor,
                    opts: ChannelOptions, state: ChannelState) -> _Group | None:
    """A group whose units are whole heads: head h is the q/k/v channels h*head_dim ... (h+1)*head_dim-1."""
    heads = int(attention.num_heads)
    head_dim = int(root.out_features) // (3 * heads)
    scores = importance.detach().float().cpu().flatten()
    if scores.numel() == 3 * heads * head_dim:
        scores = scores.view(3, heads, head_dim).mean(dim=(0, 2))
    elif scores.numel() == heads * head_dim:
        scores = scores.view(heads, head_dim).mean(dim=1)
    else:
        return None
    original_heads = (state.original.setdefault(name, heads * head_dim * 3)) // (3 * head_dim)
    removable = max(0, int(opts.ceiling * original_heads) - (original_heads - heads))
    # per_unit counts channels for the budget: one head is head_dim channels of q (k and v follow it)
    return _Group(name, root, scores, 3 * head_dim, heads, min(removable, heads - 1), heads=attention,
                  head_dim=head_dim)
