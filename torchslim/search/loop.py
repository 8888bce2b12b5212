"""``torchslim search``: trials sampled by Optuna, each a recipe variant run as ``compare`` runs one, until the
budget of trials or minutes is spent; after every trial, the front, the best recipe and a progress line."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..engine.registry import Registry
from .files import SearchState, write_files
from .front import Answer
from .halving import run_started
from .plan import SearchPlan, Source, plan
from .records import Record
from .study import Study, fingerprint
from .trial import Started, Trials


@dataclass(frozen=True)
class SearchResult:
    """What a search found: every finished trial, the front and the recommended trial."""

    records: list[Record]
    answer: Answer
    state: SearchState


def search(source: Source, out: str | os.PathLike[str], *, resume: bool = False, jobs: int = 1,
           registry: Registry | None = None, log: logging.Logger | None = None) -> SearchResult:
    """Search the space of the recipe ``source`` (its ``search:`` block), writing into ``out``.

    With ``resume``, a search already in ``out`` continues: finished trials are not run again. With ``jobs``
    above 1, that many trials run at once in spawned processes, the cores divided between them.
    """
    registry, log = registry or Registry.load(), log or logging.getLogger("torchslim")
    searched = plan(source, out, jobs, registry)
    study = Study(searched.out, searched.spec, fingerprint(searched.document.data), resume)
    study.recover(log)
    records = study.records()
    runner = Trials(searched, registry, log, _share(jobs))
    state = runner.state(records)
    if records:
        log.info("search: %d trial(s) done before; continuing", len(records))
        write_files(searched.out, state)
    start, before = time.perf_counter(), sum(r.seconds for r in records)
    while not _spent(searched, len(records), before + time.perf_counter() - start):
        for record in _batch(study, runner, records, _batch_size(searched, jobs, len(records))):
            records.append(record)
            state = runner.state(records)
            write_files(searched.out, state)
            log.info("%s", progress(state, record, before + time.perf_counter() - start, searched.spec.minutes))
    return SearchResult(records, state.answer, state)


def _batch(study: Study, runner: Trials, records: list[Record], size: int) -> list[Record]:
    """The next ``size`` trials, asked together (a sampler sees the others of the batch as running), run at once,
    and told in their order."""
    asked: list[Any] = []
    started: list[Started | Record] = []
    for number in range(len(records) + 1, len(records) + 1 + size):
        asked.append(study.ask(number))  # sampled now, by the sampler seeded for this number
        started.append(runner.start(asked[-1], number, records))
    pending = [s for s in started if isinstance(s, Started)]
    finished = {record.number: record for record in run_started(runner, pending, records, size)}
    done = [s if isinstance(s, Record) else finished[s.number] for s in started]
    for trial, record in zip(asked, done, strict=True):
        study.tell(trial, record)
    return done


def _batch_size(searched: SearchPlan, jobs: int, done: int) -> int:
    trials = searched.spec.trials
    return max(1, min(jobs, trials - done)) if trials is not None else jobs


def _share(jobs: int) -> int | None:
    """Torch threads per trial under parallel trials (None: one trial at a time, each recipe's own)."""
    if jobs == 1:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform (macOS)
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def _spent(searched: SearchPlan, done: int, seconds: float) -> bool:
    spec = searched.spec
    return (spec.trials is not None and done >= spec.trials) or (spec.minutes is not None and seconds >= spec.minutes * 60)


def progress(state: SearchState, record: Record, seconds: float, minutes: float | None = None) -> str:
    """``search: trial 3/20 (41 s elapsed): accuracy 97.2, latency 0.41 ms; front: 2 trials; best: trial 2``."""
    of = f"/{state.planned}" if state.planned is not None else ""
    limit = f" of {minutes:g} min" if minutes is not None else ""
    head = f"search: trial {record.number}{of} ({seconds:.0f} s elapsed{limit})"
    if record.error is not None:
        return f"{head}: failed: {record.error}"
    if record.stopped is not None:
        front = len(state.answer.front)
        return f"{head}: stopped after cheap rung {record.stopped} ({_figures(state, record)}); front: {front} trial(s)"
    figures = _figures(state, record)
    best = state.answer.best
    verdict = "" if best is None else f"; best: trial {best.number}"
    if best is not None and not state.answer.meets:
        verdict += " (the closest: none meets the constraints)"
    budget = "" if state.budget is None else "; meets the constraints"
    if record.misses:
        budget = f"; misses: {'; '.join(record.misses)}"
    return f"{head}: {figures}{budget}; front: {len(state.answer.front)} trial(s){verdict}"


def _figures(state: SearchState, record: Record) -> str:
    return ", ".join(f"{o if o != 'metric' else state.metric} {cell}" for o, cell in
                     zip(state.objectives, state.objective_cells(record), strict=True))
