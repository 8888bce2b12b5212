"""Structured pruning, the choice side: how many channels each group gives up, per layer or ranked
globally across groups (scores made comparable between groups), rounded to ``round_to``."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._recurrent import recurrent_width

if TYPE_CHECKING:
    from ._structured import ChannelState, _Group


def _choose_heads(groups: list[_Group], fraction: float, state: ChannelState) -> None:
    """Heads are ranked within their layer under either scope (as Torch-Pruning's head pruning ratio does):
    a head's score averages many weights and would rarely rank below single channels globally."""
    for group in groups:
        if group.heads is not None:
            group.remove = _clamped(group, _due(fraction, state.original_heads[group.heads.name], group.units))


def own_amount(name: str, amounts: Mapping[str, float] | None, default: float) -> float:
    """The amount of the first pattern of ``amounts`` that matches the group ``name`` (fnmatch), else ``default``."""
    return next((a for p, a in (amounts or {}).items() if fnmatch.fnmatchcase(name, p)), default)


def _choose_per_layer(
    groups: list[_Group], fraction: float, state: ChannelState, amounts: Mapping[str, float] | None = None
) -> None:
    """Each group loses ``fraction`` of its original units, or the amount of the first pattern of ``amounts``
    that matches its name."""
    for group in groups:
        if group.heads is not None:
            continue
        own = own_amount(group.name, amounts, fraction)
        group.remove = _clamped(group, _due(own, state.original[group.name] // group.per_unit, group.units))


def _choose_global(groups: list[_Group], fraction: float, state: ChannelState, modules: dict[str, nn.Module]) -> None:
    """Rank every group's candidate units together; each group offers only the units its ceiling allows.

    The budget is ``fraction`` of all the prunable channels, those of the groups left whole included:
    their share goes to the groups that can be pruned. Attention groups pruned by whole heads are
    outside it (:func:`_choose_heads`).
    """
    original = sum(state.original.values())
    current = sum(_out_channels(modules[name]) for name in state.original if name in modules)
    budget = _due(fraction, original, current)
    # A group whose score averages many coupled layers (a residual stream) varies less than a single
    # layer's and would never reach the bottom of the ranking: a channel ranks by the lower of its
    # score relative to its group's mean and its standing in its group scaled to a typical group's spread.
    ranked = [g for g in groups if g.heads is None]
    typical = _typical_spread(ranked)
    candidates = [
        (float(score), index)
        for index, g in enumerate(groups)
        if g.heads is None
        for score in torch.sort(_comparable(g.importance, typical)).values[: g.removable].tolist()
    ]
    for _, index in sorted(candidates):
        group = groups[index]
        if budget < group.per_unit:
            break
        group.remove += 1
        budget -= group.per_unit


def _due(fraction: float, original: int, current: int) -> int:
    """Units still to remove for ``fraction`` of ``original`` to be gone when ``current`` are left (an
    iterative prune's earlier steps removed the difference)."""
    return int(fraction * original + 0.5) - (original - current)


def _clamped(group: _Group, due: int) -> int:
    """``due`` within what the group may give up."""
    return max(0, min(due, group.removable))


def _relative(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _typical_spread(groups: list[_Group]) -> float:
    spreads = [float(_relative(g.importance).std()) for g in groups if g.importance.numel() > 1]
    return float(torch.tensor(spreads).median()) if spreads else 0.0


def _comparable(scores: torch.Tensor, typical: float) -> torch.Tensor:
    relative = _relative(scores)
    if relative.numel() < 2 or not typical:
        return relative
    spread = float(relative.std())
    if spread <= 0:
        return relative
    return torch.minimum(relative, 1.0 + (relative - relative.mean()) / spread * typical)


def _round(group: _Group, round_to: int) -> None:
    """Move the channel count left to the nearest multiple of ``round_to``, within the ceiling."""
    if round_to <= 1 or group.per_unit > 1 or group.heads is not None or group.units <= round_to:
        return
    least = group.units - group.removable
    kept = int((group.units - group.remove) / round_to + 0.5) * round_to
    if kept < least:
        kept = -(-least // round_to) * round_to
    group.remove = group.units - min(max(kept, round_to), group.units)


def _out_channels(module: nn.Module) -> int:
    value: Any = getattr(module, "out_channels", None) or getattr(module, "out_features", 0)
    return int(value) or recurrent_width(module)
