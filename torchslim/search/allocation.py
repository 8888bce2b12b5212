"""Settings per unit from a sensitivity pass: a knapsack under the stage's own budget, and per-unit bounds.

An allocation, not an optimizer: each unit (layer, group) takes one of its measured settings; the losses add
(squared relative output errors: independent errors add in quadrature), and the costs add (bits of the weights,
or parameters kept). A multiple-choice knapsack, solved by dynamic programming over the cost cut into
:data:`GRID` steps (rounded up, so the allocation never exceeds the budget), gives the least total loss within
the budget of the stage as written: the bits of uniform ``bits``, the parameters a uniform ``amount`` removes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .sensitivity import StageSensitivity

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
    kept of what the unit's largest amount removes (0 removes nothing, at no loss); the budget keeps no more
    than the uniform stage does.
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
    options, most = {}, {}
    for unit, probes in chosen.items():
        most[unit] = max([p.cost or 0.0 for p in probes], default=0.0)
        whole = [Option(0.0, most[unit], 0.0)] if allowed is None or 0.0 in allowed or min(allowed) <= 0 else []
        options[unit] = whole + [Option(p.setting, most[unit] - (p.cost or 0.0), (p.error or 0.0) ** 2) for p in probes]
    return options, sum(most.values()) - uniform


def allocate(options: Mapping[str, Sequence[Option]], capacity: float) -> dict[str, float] | None:
    """The setting of each unit with the least total loss whose total cost is at most ``capacity``; None when
    even the cheapest settings cost more (or a unit has no option)."""
    if any(not o for o in options.values()):
        return None
    floor = {u: min(o.cost for o in opts) for u, opts in options.items()}
    room = capacity - sum(floor.values())
    if room < -1e-9 * max(1.0, abs(capacity)):
        return None
    step = max(room, 1e-12) / GRID
    best = np.full(GRID + 1, math.inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for unit, opts in options.items():
        new, pick = np.full(GRID + 1, math.inf), np.full(GRID + 1, -1)
        for k, option in enumerate(opts):
            size = (
                math.ceil((option.cost - floor[unit]) / step - 1e-9)
                if room > 0
                else (0 if option.cost <= floor[unit] else GRID + 1)
            )
            if size > GRID:
                continue
            moved = np.full(GRID + 1, math.inf)
            moved[size:] = best[: GRID + 1 - size] + option.loss
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
        end -= math.ceil((option.cost - floor[unit]) / step - 1e-9) if room > 0 else 0
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
