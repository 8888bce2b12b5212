"""Settings per unit from a sensitivity pass: a knapsack under the stage's own budget, and per-unit bounds.

An allocation, not an optimizer: each unit (layer, group) takes one of its measured settings; the losses add
(squared relative output errors: independent errors add in quadrature), and the costs add (bits of the weights,
or parameters kept). A multiple-choice knapsack, solved by dynamic programming over the cost cut into
:data:`GRID` steps (:func:`allocate`: never over the budget), gives the least total loss within
the budget of the stage as written: the bits of uniform ``bits``, the parameters a uniform ``amount`` removes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .sensitivity import Probe, StageSensitivity

#: Steps the knapsack's budget is cut into.
GRID = 4000
#: A setting whose loss alone is above this many times the allocation's total loss cannot be part of a better
#: allocation under the additive model; the margin (4x in squared error: 2x in error) allows for its error.
MARGIN = 4.0


@dataclass(frozen=True)
class Option:
    """One setting of one unit: what it costs and what it loses."""

    setting: float
    cost: float
    loss: float


def stage_options(
    sens: StageSensitivity,
    allowed: Sequence[float] | None = None,
) -> tuple[dict[str, list[Option]], float]:
    """Each unit's measured settings (within ``allowed``) as options, and the budget of the stage as written.

    ``bits``: cost is the weights' bits, the budget the uniform stage's. ``amount``: cost is the parameters
    kept of what the unit's largest amount removes (0 removes nothing, at no loss); the budget removes as many
    as the uniform amount does, each group's removal counted alone (as its probes count it).
    """
    chosen = {
        u: [
            p
            for p in sens.probes
            if p.unit == u and p.error is not None and p.cost is not None and (allowed is None or p.setting in allowed)
        ]
        for u in sens.units
    }
    uniform = sens.uniform.cost or 0.0
    if sens.unit_setting == "bits":
        return (
            {u: [Option(p.setting, p.cost or 0.0, (p.error or 0.0) ** 2) for p in probes] for u, probes in chosen.items()},
            uniform,
        )
    options, most, removed = {}, {}, 0.0
    for unit, probes in chosen.items():
        most[unit] = max([p.cost or 0.0 for p in probes], default=0.0)
        whole = [Option(0.0, most[unit], 0.0)] if allowed is None or 0.0 in allowed or min(allowed) <= 0 else []
        options[unit] = whole + [Option(p.setting, most[unit] - (p.cost or 0.0), (p.error or 0.0) ** 2) for p in probes]
        removed += _removed_at(probes, sens.uniform.setting)
    # Each group's probe counts the layers it shares with the next group (their inputs); pruned together, those
    # weights go once. The budget is counted the same way: the groups' own removals at the uniform amount.
    return options, sum(most.values()) - removed


def _removed_at(probes: Sequence[Probe], amount: float) -> float:
    """The parameters a group's probes remove at ``amount``, linear between the probed amounts (0 at 0)."""
    points = sorted([(0.0, 0.0), *((p.setting, p.cost or 0.0) for p in probes)])
    for (a0, c0), (a1, c1) in itertools.pairwise(points):
        if a0 <= amount <= a1:
            return c0 + (c1 - c0) * (amount - a0) / (a1 - a0) if a1 > a0 else c1
    return points[-1][1] * amount / points[-1][0] if points[-1][0] > 0 else 0.0


def allocate(options: Mapping[str, Sequence[Option]], capacity: float) -> dict[str, float] | None:
    """The setting of each unit with the least total loss whose total cost is at most ``capacity``; None when
    even the cheapest settings cost more (or a unit has no option).

    The costs are first rounded down onto the grid (every allocation that fits is then a candidate, so the
    answer is the least loss when it fits exactly); one that does not fit once the costs are added exactly
    tightens the budget by its excess and is solved again, and after three tries the costs are rounded up
    (the answer always fits)."""
    if any(not o for o in options.values()):
        return None
    floor = {u: min(o.cost for o in opts) for u, opts in options.items()}
    room = capacity - sum(floor.values())
    if room < -1e-9 * max(1.0, abs(capacity)):
        return None
    tight = room
    for _ in range(3):
        chosen = _solve(options, floor, max(tight, 0.0), room, math.floor)
        excess = total(options, chosen, "cost") - capacity if chosen else 0.0
        if chosen is None or excess <= 1e-9 * max(1.0, abs(capacity)):
            return chosen
        tight -= excess
    return _solve(options, floor, room, room, math.ceil)


def _solve(
    options: Mapping[str, Sequence[Option]], floor: Mapping[str, float], room: float, scale: float, rounding: Any
) -> dict[str, float] | None:
    """The dynamic program: costs above each unit's cheapest, in steps of ``scale / GRID``, within ``room``."""
    step = max(scale, 1e-12) / GRID
    limit = min(GRID, math.floor(room / step + 1e-9))

    def size(unit: str, option: Option) -> int:
        return int(rounding((option.cost - floor[unit]) / step - (1e-9 if rounding is math.ceil else -1e-9)))

    best = np.full(limit + 1, math.inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for unit, opts in options.items():
        new, pick = np.full(limit + 1, math.inf), np.full(limit + 1, -1)
        for k, option in enumerate(opts):
            width = size(unit, option)
            if width > limit:
                continue
            moved = np.full(limit + 1, math.inf)
            moved[width:] = best[: limit + 1 - width] + option.loss
            better = moved < new
            new, pick = np.where(better, moved, new), np.where(better, k, pick)
        best = new
        picks.append(pick)
    end = int(np.argmin(best))
    if not math.isfinite(best[end]):
        return None
    chosen: dict[str, float] = {}
    for (unit, opts), pick in reversed(list(zip(options.items(), picks, strict=True))):
        option = opts[int(pick[end])]
        chosen[unit] = option.setting
        end -= size(unit, option)
    return {u: chosen[u] for u in options}


def total(options: Mapping[str, Sequence[Option]], allocation: Mapping[str, float], what: str) -> float:
    """The summed ``cost`` or ``loss`` of ``allocation``."""
    return float(sum(getattr(next(o for o in options[u] if o.setting == s), what) for u, s in allocation.items()))


def bounds(
    options: Mapping[str, Sequence[Option]], allocation: Mapping[str, float], capacity: float | None = None
) -> dict[str, list[float]]:
    """Each unit's settings worth searching: those whose loss alone is within :data:`MARGIN` times the
    allocation's total loss and that fit ``capacity`` with every other unit at its cheapest (the allocation's
    own setting always)."""
    limit = MARGIN * total(options, allocation, "loss")
    cheapest = {u: min(o.cost for o in opts) for u, opts in options.items()}
    spare = math.inf if capacity is None else capacity - sum(cheapest.values())

    def kept(unit: str, option: Option) -> bool:
        fits = option.cost - cheapest[unit] <= spare * (1 + 1e-9)
        return option.setting == allocation[unit] or (option.loss <= limit and fits)

    return {u: sorted({o.setting for o in opts if kept(u, o)}) for u, opts in options.items()}
