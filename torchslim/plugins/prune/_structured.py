"""Structured pruning: whole output channels and neurons removed, through torch-pruning's dependency graph.

torch-pruning traces the model and groups the layers whose channels are coupled (a conv and its
BatchNorm, the convs joined by a residual addition, a depthwise conv and the layer feeding it, a
squeeze-excite gate and the features it scales, concatenations). This module ranks the groups'
channels itself, so that a per-layer ceiling, ``round_to`` and global or per-layer ranking behave
as torchslim documents them, and asks torch-pruning only to cut the chosen channels. Its API
stays inside this module and the ones beside it: ``_structured_graph`` (the dependency graph and its
groups), ``_structured_trace`` (the graph builder's concatenations repaired, its failures explained),
``_structured_clock`` (the time limit through every phase, and progress lines), ``_structured_layers``
(per-channel tensors cut along, the user's own layer pruners), ``_structured_choice`` (how many channels
each group gives up), ``_structured_cut`` (the cut, undone if the forward breaks), ``_structured_heads``
(attention pruned by whole heads), ``_structured_data`` (importances measured on the calibration data,
and the least-squares refit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...engine.errors import first_line
from ._head_dims import Tied, coupled, cuts_tied, fit, tied_heads
from ._head_items import scored
from ._recurrent import RECURRENT_TYPES, reader_importance, refused
from ._structured_branches import Reach
from ._structured_checks import Batches
from ._structured_choice import _choose_global, _choose_heads, _choose_per_layer, _out_channels, _round
from ._structured_clock import Clock, GraphTimeout, Progress
from ._structured_cut import _precheck, _shapes_of
from ._structured_data import ActivationImportance, Lost, RefitResult, input_scales, refit, snapshot
from ._structured_graph import (
    ROOT_TYPES,
    _all_groups,
    _build_graph,
    _channel_groups,
    _protected,
)
from ._structured_heads import Heads, attention_groups, head_scores, heads_of
from ._structured_layers import LayerPruner


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
    measured: str | None = None
    """Rank channels on ``batches`` (``_structured_data``): ``energy`` (what they send to the layers reading
    them) or ``compensated`` (what of it a refit could not recover); None: by weight norm."""
    refit: bool = False
    """After each pass's cuts, refit the Linear layers that lost inputs to the pass's starting model on ``batches``."""
    batches: Iterable[torch.Tensor] | None = None
    """Calibration inputs, iterable more than once; needed by ``measured`` and ``refit``."""
    pruners: Mapping[type, LayerPruner] = field(default_factory=dict)
    """The user's own layer types and how to cut their channels (``_structured_layers``); they root groups too."""
    group_amounts: Mapping[str, float] = field(default_factory=dict)
    """Under ``layer`` scope: the fraction of some groups' channels gone after this step, by root layer name
    pattern (the first that matches); the other groups lose the step's fraction."""
    reach: Reach | None = None
    """Inputs that reach layers the example does not, and probes of the layers none reaches
    (``_structured_branches``): the graph is traced, and every cut's forward checked, on them too."""


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
    heads: Heads | None = None
    """The attention module whose heads are this group's units (its head count is updated), or None."""
    tied: list[Tied] = field(default_factory=list)
    """Attention modules whose heads are tied to the channels this group cuts: they lose head dimensions with
    them (``_head_dims``)."""


@dataclass
class ChannelState:
    """What a multi-step structured prune remembers between steps."""

    original: dict[str, int] = field(default_factory=dict)
    """Output channels of each group's root layer (by name) before the first step; attention groups
    pruned by whole heads are counted in ``original_heads`` instead."""
    original_heads: dict[str, int] = field(default_factory=dict)
    """Heads of each attention module pruned by whole heads (by its name) before the first step."""
    protected: list[str] = field(default_factory=list)
    """Layers left alone: the model's output layers and the excluded ones."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Groups left whole (by root layer name) and why: Torch-Pruning's check refused them, scoring or
    cutting them raised, or the pruned model's forward broke (the cut is undone)."""
    heads: dict[str, int] = field(default_factory=dict)
    """Attention modules pruned by whole heads: heads removed so far."""
    refits: list[RefitResult] = field(default_factory=list)
    """One per pass with ``refit``: the Linear layers refit and their output errors."""
    listed: list[str] = field(default_factory=list)
    """Root layers of the groups listed so far in this pass: where a pass that ran out of time got to."""


def prune_step(
    model: nn.Module,
    example: torch.Tensor,
    fraction: float,
    opts: ChannelOptions,
    state: ChannelState,
    log: logging.Logger | None = None,
    time_limit: float | None = None,
    heads: float | None = None,
    cpu_time: bool = False,
) -> None:
    """Remove channels so that ``fraction`` of the original prunable channels are gone after this step.

    A group that Torch-Pruning refuses (its check fails, scoring or cutting it raises) or whose cut
    breaks the model's forward is left whole and named in ``state.skipped``; under global scope its
    share of the budget goes to the other groups. Attention layers (timm's ``qkv``, Hugging Face
    BERT's ``query``/``key``/``value``: see ``_structured_heads``) are pruned by whole heads, ``heads``
    of each layer's original heads gone after this step (None: ``fraction``), outside that budget.
    ``time_limit`` counts wall seconds, or with ``cpu_time`` the process's CPU seconds (``_structured_clock``).
    """
    log = log or logging.getLogger("torchslim")
    head_fraction = fraction if heads is None else heads
    clock = Clock(time_limit, log, cpu_time)
    for attempt in range(3):  # a cut undone after the choice: trace again and give its share to the others
        try:
            undone = _prune_pass(model, example, (fraction, head_fraction), opts, state, clock)
        except GraphTimeout as exc:
            if not attempt:
                raise
            # the first pass's cuts stand: only the undone cuts' share is not given to the others
            log.info("  structured: giving the undone cuts' share to the other groups stopped: %s", exc)
            return
        if not undone or opts.scope != "global":
            return
        left = clock.left()
        if left is not None and time_limit is not None and left < RETRY_SHARE * time_limit:
            log.info(
                "  structured: %d cut(s) undone; %.0f s of time_limit left, too little to trace again and "
                "give their share to the other groups",
                undone,
                left,
            )
            return
        log.info("  structured: %d cut(s) undone; giving their share to the other groups", undone)
        clock = clock.again(left)


RETRY_SHARE = 0.5
"""A pass that gives undone cuts' share to the other groups starts only with this much of the time limit left."""


def _prune_pass(
    model: nn.Module,
    example: torch.Tensor,
    fractions: tuple[float, float],
    opts: ChannelOptions,
    state: ChannelState,
    clock: Clock,
) -> int:
    """One trace, choice and cut of (channel, head) ``fractions``; returns how many chosen cuts were refused or undone."""
    moments: dict[nn.Module, torch.Tensor] = {}  # obs's input second moments, reused by the refit
    with clock.listing():  # Torch-Pruning can spend minutes both tracing and listing the groups
        graph, groups = _graph_and_groups(model, example, opts, state, clock, moments)
    modules = dict(model.named_modules())
    _choose_heads(groups, fractions[1], state)
    if opts.scope == "global":
        _choose_global(groups, fractions[0], state, modules)
    else:
        _choose_per_layer(groups, fractions[0], state, opts.group_amounts)
    teacher = snapshot(model) if opts.refit else None
    lost: dict[nn.Module, Lost] = {}
    undone = _cut_all(model, graph, groups, example, opts, state, clock, lost)
    if teacher is not None and opts.batches is not None:
        state.refits.append(refit(model, teacher, lost, opts.batches, moments))
        clock.log.info(
            "  structured: refit %d Linear layer(s) on the calibration data: relative output error %.4f -> %.4f",
            len(state.refits[-1].layers),
            state.refits[-1].error_cut,
            state.refits[-1].error_refit,
        )
    return undone


def _cut_all(
    model: nn.Module,
    graph: Any,
    groups: list[_Group],
    example: torch.Tensor,
    opts: ChannelOptions,
    state: ChannelState,
    clock: Clock,
    lost: dict[nn.Module, Lost],
) -> int:
    """Cut the groups in turn until the time limit; returns how many chosen cuts were refused or undone
    (not counting the groups the time limit left whole)."""
    started, progress = time.monotonic(), Progress(clock.log, "cut")

    def forward() -> Any:  # what every cut is checked on: the example, the other branches' inputs and probes
        with torch.no_grad():
            return _shapes_of(opts.reach.check(model, example) if opts.reach else model(example))

    expected = forward()
    before, late = len(state.skipped), 0
    batches = Batches(model, graph, forward, expected, state, lost)  # several cuts checked by one forward
    for index, group in enumerate(groups):
        if group.remove > 0 and clock.cutting_over():
            batches.flush()
            late += 1
            state.skipped.setdefault(
                group.name,
                f"not cut: time_limit={clock.seconds:g} s{clock.kind} ran out "
                f"after {index} of {len(groups)} groups (raise time_limit)",
            )
            continue
        _round(group, opts.round_to)
        fit(group, group.tied)  # a multiple of the head counts of the attention tied to its channels
        batches.add(group)
        progress.tick(index + 1, len(groups), group.name)
    batches.flush()
    clock.log.info(
        "  structured: cut %d groups in %.1f s, checked by %d forwards (%d left whole)",
        len(groups),
        time.monotonic() - started,
        batches.forwards,
        len(state.skipped),
    )
    return len(state.skipped) - before - late


def _graph_and_groups(
    model: nn.Module,
    example: torch.Tensor,
    opts: ChannelOptions,
    state: ChannelState,
    clock: Clock,
    moments: dict[nn.Module, torch.Tensor],
) -> tuple[Any, list[_Group]]:
    import torch_pruning as tp

    state.listed = []  # before tracing: a pass that runs out of time there has listed nothing
    clock.phase = "tracing the dependency graph"
    graph, unmapped = _build_graph(
        model, example, clock.log, clock.seconds, opts.pruners, opts.reach.forward if opts.reach else None
    )
    names = {module: name for name, module in model.named_modules()}
    roots = ROOT_TYPES + tuple(opts.pruners)
    protected = _protected(graph, names, opts.exclude, roots, opts.reach.joins if opts.reach else set())
    state.protected = sorted(names[m] for m in protected)
    scorer: Any = tp.importance.GroupMagnitudeImportance(p=opts.norm, group_reduction="mean", normalizer="mean")
    if opts.measured is not None and opts.batches is not None:
        clock.phase = "measuring the calibration data"
        scorer = ActivationImportance(input_scales(model, opts.batches, opts.measured == "compensated", moments), scorer)
    clock.phase = "listing and scoring the groups"
    groups: list[_Group] = []
    try:
        _list(graph, _all_groups(graph, protected, clock, roots, unmapped), names, scorer, opts, state, groups, clock)
        clock.stop()
    except GraphTimeout as exc:
        clock.stop()  # the timer fired while listing, or between the listing's end and the line above
        if not groups:
            raise
        state.skipped.setdefault(
            "(groups not listed)",
            f"{exc}: listing stopped after {len(state.listed)} groups, the last rooted at {state.listed[-1]} (raise time_limit)",
        )
    groups += attention_groups(names, opts, state)  # nn.MultiheadAttention's heads: not in the graph
    clock.log.info("  structured: %d groups listed and scored in %.1f s%s", len(groups), clock.elapsed(), clock.kind)
    return graph, groups


def _list(
    graph: Any,
    found: Iterator[tuple[nn.Module, Any, str | None]],
    names: dict[nn.Module, str],
    scorer: Any,
    opts: ChannelOptions,
    state: ChannelState,
    groups: list[_Group],
    clock: Clock,
) -> None:
    """Score the groups ``found`` and append to ``groups`` those that Torch-Pruning can cut; name the others."""
    progress = Progress(clock.log, "listed")
    for root, group, problem in found:
        name = names.get(root, type(root).__name__)
        state.listed.append(name)
        progress.tick(len(state.listed), None, name)
        if problem is not None:
            _skip(state, name, root, problem, names)
            continue
        if name in state.skipped:
            continue
        try:
            described = _describe(graph, group, names, scorer, opts, state)
        except Exception as exc:
            _skip(state, name, root, f"scoring raised {first_line(exc, typed=True, limit=200)}", names)
            continue
        if described is None:
            continue
        problem = refused(root) or _precheck(graph, described)
        if problem:
            _skip(state, name, root, problem, names)
            continue
        groups.append(described)


def _skip(state: ChannelState, name: str, root: nn.Module, reason: str, names: dict[nn.Module, str]) -> None:
    state.skipped.setdefault(name, reason)
    if heads_of(root, names) is None:  # heads are outside the channel budget, skipped or not
        state.original.setdefault(name, _out_channels(root))


def group_names(model: nn.Module, example: torch.Tensor, opts: ChannelOptions, log: logging.Logger) -> list[str]:
    """The root layers of the groups of coupled channels a prune with ``opts`` would cut (attention heads aside)."""
    state = ChannelState()
    _, groups = _graph_and_groups(model.eval(), example, opts, state, Clock(None, log), {})
    return [g.name for g in groups if g.heads is None]


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
        return f"no channel could be removed: every prunable layer is an output layer or excluded (left alone: {left_alone})"
    whole = "; ".join(f"{name}: {reason}" for name, reason in state.skipped.items())
    return (
        f"no channel could be removed: {len(state.skipped)} group(s) of coupled channels left whole ({whole}); "
        f"output or excluded layers left alone: {left_alone}"
    )


def _describe(
    graph: Any, group: Any, names: dict[nn.Module, str], scorer: Any, opts: ChannelOptions, state: ChannelState
) -> _Group | None:
    root = group[0].dep.target.module
    if root not in names:
        return None
    heads = heads_of(root, names)
    if (heads is not None and tied_heads(heads.module)) or cuts_tied(graph, group):
        return None  # its heads narrow with the channels it reads, in their group (_head_dims)
    importance = scorer(group if heads is None else scored(graph, group, heads))  # per-head tensors: not channels
    if importance is None and isinstance(root, RECURRENT_TYPES):  # read only by recurrent layers
        importance = reader_importance(graph, group, opts.norm)
    if importance is None:
        _skip(
            state,
            names[root],
            root,
            "nothing scores its channels: no Conv, Linear or normalization layer among the layers coupled to it",
            names,
        )
        return None
    per_unit = _channel_groups(graph, group)
    units = int(importance.numel()) // per_unit
    if per_unit > 1:
        importance = importance.view(per_unit, units).mean(dim=0)
    name = names[root]
    if heads is not None and per_unit == 1:
        return _describe_heads(name, root, heads, importance, opts, state)
    original = state.original.setdefault(name, units * per_unit) // per_unit
    removable = max(0, int(opts.ceiling * original) - (original - units))
    return _Group(
        name, root, importance.detach().float().cpu(), per_unit, units, min(removable, units - 1), tied=coupled(graph, group)
    )


def _describe_heads(
    name: str, root: nn.Module, heads: Heads, importance: torch.Tensor, opts: ChannelOptions, state: ChannelState
) -> _Group | None:
    """A group whose units are whole heads, each scored by the mean importance of its channels."""
    scores = head_scores(heads, importance)
    if scores is None:
        return None
    original = state.original_heads.setdefault(heads.name, heads.count)
    removable = max(0, int(opts.ceiling * original) - (original - heads.count))
    # per_unit: the root's channels per head (q, k and v for a fused qkv); never fewer than one head left
    return _Group(name, root, scores, heads.fused * heads.head_dim, heads.count, min(removable, heads.count - 1), heads=heads)
