"""``torchslim search``: trials sampled by Optuna, each a recipe variant run as ``compare`` runs one, until the
budget of trials or minutes is spent; after every trial, the front, the best recipe and a progress line."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..compare.executors import make_executor
from ..engine.registry import Registry
from .files import SearchState, write_files
from .front import Answer
from .inflight import Flights
from .per_unit import expand
from .plan import SearchPlan, Source, plan
from .records import Record
from .reference import prepare_reference
from .space import size
from .study import Study, fingerprint
from .tracked import SearchTracker
from .trial import Trials


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
    going = _Going(searched, study, runner, log, tracked, records, state, study.spent_seconds(), size=size(searched.spec))
    try:
        with executes.pool(log, jobs) as pool:
            if jobs > 1:
                log.info("search: up to %d trials at once (%s); the next starts as soon as one ends", jobs, executes.describe())
            _fly(going, Flights(runner, pool), jobs)
        going.state = runner.state(going.records)
        write_files(searched.out, going.state)
    except BaseException:
        if tracked is not None:
            tracked.close(failed=True)
        raise
    if tracked is not None:
        log.info("search: logged to MLflow at %s", tracked.close())
    return SearchResult(going.records, going.state.answer, going.state)


@dataclass
class _Going:
    """A search under way: what it updates as each trial lands."""

    searched: SearchPlan
    study: Study
    runner: Trials
    log: logging.Logger
    tracked: SearchTracker | None
    records: list[Record]
    state: SearchState
    before: float
    """The seconds its earlier trials took (a resumed search)."""
    start: float = field(default_factory=time.perf_counter)
    size: int | None = None
    """How many distinct trials the space holds (None: without end)."""
    exhausted: bool = False

    def elapsed(self) -> float:
        """The search's seconds, its earlier trials' included."""
        return self.before + time.perf_counter() - self.start

    def spent(self) -> bool:
        """Whether the budget allows no new trial, or, under a budget of minutes alone, the space none it has not
        tried (a finite space would otherwise repeat its trials until the minutes run out)."""
        if _spent(self.searched, self.study, self.elapsed()):
            return True
        if self.size is None or self.searched.spec.trials is not None:
            return False  # a budget of trials ends the search anyway (a repeat is recorded at once, not run again)
        if len({json.dumps(r.values, sort_keys=True, default=str) for r in self.records}) < self.size:
            return False
        if not self.exhausted:
            self.log.info("search: all %d value(s) of the space tried", self.size)
        self.exhausted = True
        return True

    def landed(self, trial: Any, record: Record) -> None:
        """A trial ended: told to the study; the front, the files, the progress line and the tracker updated."""
        self.study.tell(trial, record)
        self.records.append(record)
        self.state = self.runner.state(self.records)
        write_files(self.searched.out, self.state)
        self.log.info("%s", progress(self.state, record, self.elapsed(), self.searched.spec.minutes))
        if self.tracked is not None:
            self.tracked.trial(record)
        self.records = self.study.records()  # with a shared storage, the trials other searches finished meanwhile too


def _fly(going: _Going, flights: Flights, jobs: int) -> None:
    """Keep ``jobs`` trials in flight: one starts whenever a slot is free and the budget is not spent; the trials
    running when it is spent finish."""
    while True:
        while len(flights) < jobs and not going.spent():
            asked = _ask(going.study, going.searched.spec.trials)
            if asked is None:  # the planned trials are all taken (by other searches of a shared study too)
                break
            done = flights.launch(*asked, going.records)
            if done is not None:
                going.landed(asked[0], done)
        if not flights:
            return
        trial, done = flights.land(going.records)
        if done is not None:
            going.landed(trial, done)


def _ask(study: Study, planned: int | None) -> tuple[Any, int] | None:
    """The next trial and its number (a sampler sees the trials in flight as running); None when the planned
    trials are all taken."""
    if planned is not None and study.next_number() > planned:
        return None
    trial, number = study.ask()  # sampled when its values are suggested, by the sampler seeded for its number
    if planned is not None and number > planned:  # another search sharing the study asked the last one first
        study.release(trial, number)
        return None
    return trial, number


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
