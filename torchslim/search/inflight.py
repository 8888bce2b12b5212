"""Trials in flight: a search keeps ``--jobs`` trials running and starts the next as soon as one ends, where a
batch of trials would wait for its slowest (a trial stopped after its cheap rung, or one of fewer epochs, left its
slot idle). Each trial goes through its cheap rungs (``search.cheap``; :mod:`.halving` judges it after each) and
then its full run, one job of the pool at a time.

A trial is judged at a rung against every run measured at that rung so far: the earlier trials' records and the
rungs of the trials still in flight. With one job this is the order of a search run one trial after another, so
a resumed search decides as the uninterrupted one did; with several, which trials a trial meets at its rung depends
on which ended first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..compare.executors import Pool
from .halving import at_rung, promising, whole
from .records import Record
from .rungs import rung_document
from .trial import Started, Trials


@dataclass
class Flight:
    """A trial between its start and its record."""

    trial: Any
    """Its Optuna trial, told when it lands."""
    started: Started
    """The trial as started: its full recipe."""
    current: Started
    """The run in the pool now: a cheap rung's, or the full one."""
    rung: int = 0
    """The index of that run among the cheap rungs (their count: the full run)."""
    runs: list[Record] = field(default_factory=list)
    """Its cheap rungs' records so far."""


class Flights:
    """The trials of a search in flight in ``pool``."""

    def __init__(self, runner: Trials, pool: Pool) -> None:
        self.runner, self.pool = runner, pool
        cheap = runner.searched.spec.cheap
        self.rungs = list(cheap.rungs) if cheap is not None else []
        self.live: dict[int, Flight] = {}
        """By the pool's token of the run each has in it."""

    def __len__(self) -> int:
        return len(self.live)

    def launch(self, trial: Any, number: int, earlier: list[Record]) -> Record | None:
        """Start trial ``number``; its record at once when it needs no run (a refused value, a repeat)."""
        started = self.runner.start(trial, number, earlier)
        if isinstance(started, Record):
            return started
        return self._submit(Flight(trial, started, started), 0)

    def land(self, earlier: Sequence[Record]) -> tuple[Any, Record | None]:
        """Wait for the next run to end: its trial, and the trial's record when that was its last run."""
        token, outcome = self.pool.wait()
        flight = self.live.pop(token)
        result = self.runner.finish(flight.current, outcome)
        if flight.rung == len(self.rungs):
            return flight.trial, whole(result, flight.runs)
        return flight.trial, self._judge(flight, result, earlier)

    def _judge(self, flight: Flight, result: Record, earlier: Sequence[Record]) -> Record | None:
        """After a cheap rung: the trial goes on to its next run (None), or its record (failed, or stopped)."""
        index, spec = flight.rung, self.runner.searched.spec
        flight.runs.append(result)
        if not result.ok:
            return whole(result, flight.runs)
        found = [at_rung(e, index) for e in earlier]
        found += [f.runs[index] for f in self.live.values() if len(f.runs) > index]
        competitors = [r for r in found if r is not None and r.ok]
        assert spec.cheap is not None
        if promising(result, competitors, spec.objectives, spec.cheap.reduction_factor):
            self.runner.log.info("search: trial %d: promoted after cheap rung %d", flight.started.number, index)
            return self._submit(flight, index + 1)
        return dataclasses.replace(whole(result, flight.runs), stopped=index)

    def _submit(self, flight: Flight, index: int) -> Record | None:
        """Put ``flight``'s run ``index`` (a cheap rung, or the full run) in the pool; the trial's record instead
        when that rung's recipe is refused."""
        run = flight.started
        if index < len(self.rungs):
            cheap = self.runner.rung(run, index, rung_document(run.recipe, self.rungs[index], index))
            if isinstance(cheap, Record):
                flight.runs.append(cheap)
                return whole(cheap, flight.runs)
            run = cheap
        flight.current, flight.rung = run, index
        self.live[self.pool.submit(self.runner.job(run))] = flight
        return None
