"""The answer of a search so far: the Pareto front of its objectives, and the one trial to recommend.

With constraints, the front is that of the trials that meet them, and the recommendation is its best-metric
trial; when none meets them, the front is that of every trial that ran, and the recommendation is the trial
that misses the limits by the least (the sum of its misses, each a fraction of its limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..compare.pareto import best
from ..engine.study_fields import Objective
from .objectives import total_miss
from .records import Record


@dataclass(frozen=True)
class Answer:
    """The front and the recommended trial."""

    front: list[Record]
    best: Record | None
    meets: bool
    """Whether ``best`` (and the front) meet the constraints (True without constraints)."""


def answer(records: Sequence[Record], objectives: Sequence[Objective], metric: str, constrained: bool) -> Answer:
    """The front of ``records`` over ``objectives`` and the trial to recommend."""
    ran = [r for r in records if r.ok]
    passing = [r for r in ran if not r.misses]
    if constrained and not passing:
        closest = min(ran, key=lambda r: (total_miss(r.excess), -float(r.final.get(metric, 0.0))), default=None)
        return Answer(pareto(ran, objectives), closest, False)
    members = pareto(passing, objectives)
    chosen = best([(str(r.number), r.final) for r in members], metric)  # ties to the smaller file, as compare's
    found = next((r for r in members if str(r.number) == chosen), None)
    if found is None and members:  # the size not measured: the best metric alone
        found = max(members, key=lambda r: float(r.final.get(metric, float("-inf"))))
    return Answer(members, found, True)


def pareto(records: Sequence[Record], objectives: Sequence[Objective]) -> list[Record]:
    """The records no other record beats on every objective (at least as good on each, better on one)."""
    signs = [-1.0 if o == "metric" else 1.0 for o in objectives]  # everything minimised
    costs = [[s * v for s, v in zip(signs, r.objectives, strict=True)] for r in records]
    return [r for r, c in zip(records, costs, strict=True) if not any(_dominates(other, c) for other in costs)]


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))
