"""Cheap before expensive (``search.cheap``): successive halving over a search's trials.

Every trial first runs at the cheapest rung (its stages' epochs scaled down, its metric scored on a part of the
eval data: the same recipe path as a full run, with its own baseline measured on the same part); after each rung,
Optuna's ``SuccessiveHalvingPruner`` decides whether it goes on (about one in ``reduction_factor`` does), and the
trials that pass every rung run in full. The Pareto front and ``best.yaml`` are chosen among full runs alone.

Optuna's pruners take one objective (``Trial.report`` refuses a multi-objective study), so the value each rung
is judged by is the trial's rank among the trials measured at that rung: its non-dominated rank (NSGA-II's
fronts) among those that meet the constraints, and after all of them, those that miss by their total miss. With
one objective this orders the trials as their values do. The decision is replayed from the search's records (not
left in the study), so a resumed search decides as the uninterrupted one did; and a trial that no other beats at
a rung had rank 0 when it was judged, so every member of the cheap front was run in full. The trials run through
their rungs in :mod:`.inflight`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..engine.study_fields import Objective
from .front import pareto
from .objectives import total_miss
from .records import Record
from .study import keeps


def at_rung(record: Record, index: int) -> Record | None:
    """``record``'s run at cheap rung ``index``, if it ran there and was measured."""
    if len(record.rungs) <= index:
        return None
    found = Record.from_attr(record.rungs[index])
    return found if found.ok else None


def ranks(records: Sequence[Record], objectives: Sequence[Objective]) -> list[int]:
    """Each record's rank (0 best): non-dominated fronts of those that meet the constraints, then the others by
    their total miss (the same miss, the same rank)."""
    out = [0] * len(records)
    left = [i for i, r in enumerate(records) if total_miss(r.excess) == 0]
    level = 0
    while left:
        front = {id(r) for r in pareto([records[i] for i in left], objectives)}
        for i in left:
            out[i] = level if id(records[i]) in front else out[i]
        left = [i for i in left if id(records[i]) not in front]
        level += 1
    missing = sorted({total_miss(r.excess) for r in records if total_miss(r.excess) > 0})
    for i, record in enumerate(records):
        if total_miss(record.excess) > 0:
            out[i] = level + missing.index(total_miss(record.excess))
    return out


def promising(result: Record, competitors: Sequence[Record], objectives: Sequence[Objective], factor: int) -> bool:
    """Whether ``result`` (a trial's run at a cheap rung) goes on, against the runs measured at that rung."""
    ranked = ranks([*competitors, result], objectives)
    return keeps(ranked[-1], ranked[:-1], factor)


def whole(last: Record, cheap: Sequence[Record]) -> Record:
    """The trial's record: the figures of its ``last`` run (a cheap one, or the full one), its ``cheap`` runs kept,
    its time the sum of its runs'."""
    full = 0.0 if any(r is last for r in cheap) else last.seconds
    return dataclasses.replace(last, rungs=[r.to_attr() for r in cheap], seconds=sum(r.seconds for r in cheap) + full)
