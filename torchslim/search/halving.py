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
a rung had rank 0 when it was judged, so every member of the cheap front was run in full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..compare.executors import Executor
from ..compare.jobs import Outcome
from ..engine.study_fields import CheapRung, Objective
from .front import pareto
from .objectives import total_miss
from .records import Record
from .rungs import rung_document
from .study import keeps
from .trial import Started, Trials


def run_started(runner: Trials, pending: Sequence[Started], earlier: Sequence[Record], executes: Executor) -> list[Record]:
    """The records of the started trials: each run in full, or with ``search.cheap`` rung by rung, a trial that is
    not promising enough at a rung stopped there. ``earlier`` are the search's records before them."""
    cheap = runner.searched.spec.cheap
    if cheap is None:
        return [runner.finish(s, o) for s, o in zip(pending, _execute(runner, pending, executes), strict=True)]
    runs: dict[int, list[Record]] = {s.number: [] for s in pending}
    done: dict[int, Record] = {}
    going = list(pending)
    for index, rung in enumerate(cheap.rungs):
        results = _run_rung(runner, going, index, rung, executes)
        competitors = [r for r in (at_rung(e, index) for e in earlier) if r is not None]
        promoted = []
        for started, result in zip(going, results, strict=True):
            runs[started.number].append(result)
            if not result.ok:
                done[started.number] = _whole(result, runs[started.number])
                continue
            if _promising(result, competitors, runner.searched.spec.objectives, cheap.reduction_factor):
                runner.log.info("search: trial %d: promoted after cheap rung %d", started.number, index)
                promoted.append(started)
            else:
                done[started.number] = dataclasses.replace(_whole(result, runs[started.number]), stopped=index)
            competitors.append(result)  # the later trials of the batch compete with it, as in a search of one job
        going = promoted
    for started, outcome in zip(going, _execute(runner, going, executes), strict=True):
        done[started.number] = _whole(runner.finish(started, outcome), runs[started.number])
    return [done[s.number] for s in pending]


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


def _promising(result: Record, competitors: Sequence[Record], objectives: Sequence[Objective], factor: int) -> bool:
    ranked = ranks([*competitors, result], objectives)
    return keeps(ranked[-1], ranked[:-1], factor)


def _run_rung(runner: Trials, going: Sequence[Started], index: int, rung: CheapRung, executes: Executor) -> list[Record]:
    """Rung ``index`` of each trial in ``going``: its record (refused, failed, or measured)."""
    starts = [runner.rung(s, index, rung_document(s.recipe, rung, index)) for s in going]
    runnable = [s for s in starts if isinstance(s, Started)]
    outcomes = iter(_execute(runner, runnable, executes))
    return [runner.finish(s, next(outcomes)) if isinstance(s, Started) else s for s in starts]


def _execute(runner: Trials, started: Sequence[Started], executes: Executor) -> list[Outcome]:
    return executes.run([runner.job(s) for s in started], runner.log)


def _whole(last: Record, cheap: Sequence[Record]) -> Record:
    """The trial's record: the figures of its ``last`` run (a cheap one, or the full one), its ``cheap`` runs kept,
    its time the sum of its runs'."""
    full = 0.0 if any(r is last for r in cheap) else last.seconds
    return dataclasses.replace(last, rungs=[r.to_attr() for r in cheap], seconds=sum(r.seconds for r in cheap) + full)
