"""``torchslim search``: trials sampled by Optuna, each a recipe variant run as ``compare`` runs one, until the
budget of trials or minutes is spent; after every trial, the front, the best recipe and a progress line."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..compare.finished import baseline_key
from ..compare.jobs import Job, execute
from ..engine.errors import RecipeError, TorchslimError
from ..engine.metrics import torch_threads
from ..engine.prepare import prepare
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.report import Row
from ..engine.runner import baseline_row
from .files import SearchState, write_files
from .front import Answer, answer
from .objectives import excesses, values
from .plan import TRIALS_DIR, SearchPlan, Source, plan
from .records import Record, describe_values, kept_figures, trial_folder
from .space import sample, trial_document
from .study import Study, fingerprint


@dataclass(frozen=True)
class SearchResult:
    """What a search found: every finished trial, the front and the recommended trial."""

    records: list[Record]
    answer: Answer
    state: SearchState


def search(source: Source, out: str | os.PathLike[str], *, resume: bool = False, jobs: int = 1,
           registry: Registry | None = None, log: logging.Logger | None = None) -> SearchResult:
    """Search the space of the recipe ``source`` (its ``search:`` block), writing into ``out``.

    With ``resume``, a search already in ``out`` continues: finished trials are not run again.
    """
    registry, log = registry or Registry.load(), log or logging.getLogger("torchslim")
    searched = plan(source, out, jobs, registry)
    study = Study(searched.out, searched.spec, fingerprint(searched.document.data), resume)
    study.recover(log)
    records = study.records()
    runner = _Trials(searched, registry, log)
    state = runner.state(records)
    if records:
        log.info("search: %d trial(s) done before; continuing", len(records))
        write_files(searched.out, state)
    start, before = time.perf_counter(), sum(r.seconds for r in records)
    while not _spent(searched, len(records), before + time.perf_counter() - start):
        number = len(records) + 1
        trial = study.ask(number)
        record = runner.run(trial, number, records)
        study.tell(trial, record)
        records.append(record)
        state = runner.state(records)
        write_files(searched.out, state)
        log.info("%s", progress(state, record, before + time.perf_counter() - start))
    return SearchResult(records, state.answer, state)


def _spent(searched: SearchPlan, done: int, seconds: float) -> bool:
    spec = searched.spec
    return (spec.trials is not None and done >= spec.trials) or (spec.minutes is not None and seconds >= spec.minutes * 60)


class _Trials:
    """Running one trial: sample, set into the recipe, validate, run with the shared baseline, judge."""

    def __init__(self, searched: SearchPlan, registry: Registry, log: logging.Logger) -> None:
        self.searched, self.registry, self.log = searched, registry, log
        self.metric = searched.recipe.evaluate.label
        self.defaults = searched.recipe.resolved()
        self.baselines: dict[str, Row] = {}

    def run(self, trial: Any, number: int, earlier: list[Record]) -> Record:
        """The record of trial ``number``: what it measured, or why it failed (an earlier trial's, for the same values)."""
        start = time.perf_counter()
        chosen = sample(trial, self.searched.spec, self.searched.document.data, self.defaults)
        folder = trial_folder(number, chosen)
        self.log.info("search: trial %d: %s", number, describe_values(chosen))
        same = next((r for r in earlier if r.values == chosen), None)
        if same is not None:  # a discrete space sampled again: the recipe is the same, and so is the result
            self.log.info("search: trial %d has the values of trial %d: its result, not run again", number, same.number)
            return dataclasses.replace(same, number=number, seconds=0.0)
        try:
            return self._measure(number, chosen, folder, start)
        except TorchslimError as exc:  # a refused value, a model that does not build with it
            return Record(number, chosen, folder, time.perf_counter() - start, error=str(exc))

    def _measure(self, number: int, chosen: dict[str, Any], folder: str, start: float) -> Record:
        recipe = self._recipe(number, chosen)
        document = recipe.document
        assert document is not None
        baseline = self._baseline(recipe)
        job = Job(recipe.name, document, self.registry, self.searched.out / TRIALS_DIR / folder, baseline, None, False, recipe)
        outcome = execute(job, self.log)
        seconds = time.perf_counter() - start
        if outcome.report is None:
            return Record(number, chosen, folder, seconds, error=outcome.error)
        final, base = outcome.report.final.metrics, baseline.metrics
        found = values(self.searched.spec.objectives, final, self.metric)
        kept, kept_base = kept_figures(final, self.metric), kept_figures(base, self.metric)
        if isinstance(found, str):
            return Record(number, chosen, folder, seconds, error=found, final=kept, baseline=kept_base)
        budget = self.searched.budget
        misses = budget.failures(final, base, self.metric) if budget else []
        excess = excesses(budget, final, base, self.metric) if budget else {}
        return Record(number, chosen, folder, seconds, None, kept, kept_base, found, misses, excess)

    def _recipe(self, number: int, chosen: dict[str, Any]) -> RecipeBase:
        searched = self.searched
        document = trial_document(searched.document, chosen, searched.recipe, f"{searched.recipe.name}-trial{number}")
        try:
            return validate(document, self.registry)
        except RecipeError as exc:
            raise RecipeError([f"{p} (in search trial {number})" for p in exc.problems]) from None

    def _baseline(self, recipe: RecipeBase) -> Row:
        """The baseline of the trial's model, measured once per model, data and measurement (as compare shares one)."""
        found = baseline_key(recipe)
        if found not in self.baselines:
            self.log.info("search: measuring the baseline once, for every trial that shares it")
            with torch_threads(recipe.work_threads()):  # as torchslim.run builds and scores it
                ctx, model = prepare(recipe, self.log)
                self.baselines[found] = baseline_row(model, ctx, recipe.metrics)
        return self.baselines[found]

    def state(self, records: list[Record]) -> SearchState:
        """The search's state after ``records``: its answer and the recipe of its recommended trial."""
        searched = self.searched
        found = answer(records, searched.spec.objectives, self.metric, searched.budget is not None)
        best = None
        if found.best is not None:
            name = f"{searched.recipe.name}-trial{found.best.number}"
            best = trial_document(searched.document, found.best.values, searched.recipe, name).data
        return SearchState(records, found, searched.spec.objectives, self.metric, searched.budget, best, searched.spec.trials)


def progress(state: SearchState, record: Record, seconds: float) -> str:
    """``search: trial 3/20 (41 s elapsed): accuracy 97.2, latency 0.41 ms; front: 2 trials; best: trial 2``."""
    of = f"/{state.planned}" if state.planned is not None else ""
    head = f"search: trial {record.number}{of} ({seconds:.0f} s elapsed)"
    if not record.ok:
        return f"{head}: failed: {record.error}"
    figures = ", ".join(f"{o if o != 'metric' else state.metric} {cell}" for o, cell in
                        zip(state.objectives, state.objective_cells(record), strict=True))
    best = state.answer.best
    verdict = "" if best is None else f"; best: trial {best.number}"
    if best is not None and not state.answer.meets:
        verdict += " (the closest: none meets the constraints)"
    budget = "" if state.budget is None else "; meets the constraints"
    if record.misses:
        budget = f"; misses: {'; '.join(record.misses)}"
    return f"{head}: {figures}{budget}; front: {len(state.answer.front)} trial(s){verdict}"

