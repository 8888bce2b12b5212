"""``torchslim search``: trials sampled by Optuna, each a recipe variant run as ``compare`` runs one, until the
budget of trials or minutes is spent; after every trial, the front, the best recipe and a progress line."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..compare.executors import Executor, make_executor
from ..engine.registry import Registry
from .files import SearchState, write_files
from .front import Answer
from .halving import run_started
from .per_unit import expand
from .plan import SearchPlan, Source, plan
from .records import Record
from .reference import prepare_reference
from .study import Study, fingerprint
from .tracked import SearchTracker
from .trial import Started, Trials


@dataclass(frozen=True)
class SearchResult:
    """What a search found: every finished trial, the front and the recommended trial."""

    records: list[Record]
    answer: Answer
    state: SearchState


def search(
    source: Source,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    jobs: int = 1,
    executor: str = "local",
    storage: str | None = None,
    track: str | None = None,
    registry: Registry | None = None,
    log: logging.Logger | None = None,
) -> SearchResult:
    """Search the space of the recipe ``source`` (its ``search:`` block), writing into ``out``.

    With ``resume``, a search already in ``out`` (or in ``storage``) continues: finished trials are not run again.
    With ``jobs`` above 1, that many trials run at once: in spawned processes dividing the cores (``executor``
    ``local``), or as tasks of a Ray cluster (``ray[:ADDRESS]``). ``storage``: a database URL (``sqlite:///...``,
    ``postgresql://...``) holding the study instead of the journal file in ``out``, shared by the searches that
    open it.
    """
    registry, log = registry or Registry.load(), log or logging.getLogger("torchslim")
    searched = plan(source, out, jobs, registry)
    executes = make_executor(executor, jobs, announce=False)
    study = Study(searched.out, searched.spec, fingerprint(searched.document.data), resume, storage)
    searched, first = expand(searched, registry, log)  # per-layer / per-group dimensions, from a sensitivity pass
    if first:
        study.enqueue_first(first)
    study.recover(log)
    records = study.records()
    runner = Trials(searched, registry, log, _share(jobs) if executes.divides_cores else None)
    runner.reference = prepare_reference(searched, registry, log, runner)
    state = runner.state(records)
    if records:
        log.info("search: %d trial(s) done before; continuing", len(records))
        write_files(searched.out, state)
    tracked = SearchTracker(track, searched.out, storage) if track is not None else None
    start, before = time.perf_counter(), study.spent_seconds()
    try:
        while not _spent(searched, study, before + time.perf_counter() - start):
            done = _batch(study, runner, records, jobs, executes)
            for record in done:
                records.append(record)
                state = runner.state(records)
                write_files(searched.out, state)
                log.info("%s", progress(state, record, before + time.perf_counter() - start, searched.spec.minutes))
                if tracked is not None:
                    tracked.trial(record)
            records = study.records()  # with a shared storage, the trials other searches finished meanwhile too
            if not done:  # the other searches of a shared study took the trials left
                break
        state = runner.state(records)
        write_files(searched.out, state)
    except BaseException:
        if tracked is not None:
            tracked.close(failed=True)
        raise
    if tracked is not None:
        log.info("search: logged to MLflow at %s", tracked.close())
    return SearchResult(records, state.answer, state)


def _batch(study: Study, runner: Trials, records: list[Record], size: int, executes: Executor) -> list[Record]:
    """Up to ``size`` trials, asked together (a sampler sees the others of the batch as running), run at once,
    and told in their order."""
    asked: list[Any] = []
    started: list[Started | Record] = []
    planned = runner.searched.spec.trials
    while len(asked) < size and (planned is None or study.next_number() <= planned):
        trial, number = study.ask()  # sampled when its values are suggested, by the sampler seeded for its number
        if planned is not None and number > planned:  # another search sharing the study asked the last one first
            study.release(trial, number)
            break
        asked.append(trial)
        started.append(runner.start(trial, number, records))
    pending = [s for s in started if isinstance(s, Started)]
    finished = {record.number: record for record in run_started(runner, pending, records, executes)}
    done = [s if isinstance(s, Record) else finished[s.number] for s in started]
    for trial, record in zip(asked, done, strict=True):
        study.tell(trial, record)
    return done


def _share(jobs: int) -> int | None:
    """Torch threads per trial under parallel trials (None: one trial at a time, each recipe's own)."""
    if jobs == 1:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform (macOS)
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def _spent(searched: SearchPlan, study: Study, seconds: float) -> bool:
    spec = searched.spec
    if spec.minutes is not None and seconds >= spec.minutes * 60:
        return True
    return spec.trials is not None and study.next_number() > spec.trials


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
    return ", ".join(
        f"{o if o != 'metric' else state.metric} {cell}"
        for o, cell in zip(state.objectives, state.objective_cells(record), strict=True)
    )
