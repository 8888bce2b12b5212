"""One trial of a search, in two halves around its run: :meth:`Trials.start` samples the values, sets them into the
recipe, validates it and finds its baseline; the run is a ``compare`` job (:mod:`torchslim.compare.jobs`); then
:meth:`Trials.finish` reads the objectives and judges the constraints. A trial that fails before its run (a refused
value) or repeats an earlier trial's values is a :class:`Record` at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..compare.finished import baseline_key
from ..compare.jobs import Job, Outcome
from ..engine.errors import RecipeError, TorchslimError
from ..engine.metrics import torch_threads
from ..engine.prepare import prepare
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.report import Row
from ..engine.runner import baseline_row
from ..engine.yamlio import Document
from .files import SearchState
from .front import answer
from .objectives import excesses, values
from .plan import TRIALS_DIR, SearchPlan
from .records import Record, describe_values, kept_figures, trial_folder
from .reference import Reference, paired_latency, with_reference
from .space import sample, trial_document


@dataclass(frozen=True)
class Started:
    """A trial ready to run: its values, its validated recipe and its baseline."""

    number: int
    values: dict[str, Any]
    folder: str
    start: float
    recipe: RecipeBase
    baseline: Row


class Trials:
    """What every trial of a search shares: the plan, the registry, the baselines measured so far."""

    def __init__(self, searched: SearchPlan, registry: Registry, log: logging.Logger, threads: int | None) -> None:
        self.searched, self.registry, self.log, self.threads = searched, registry, log, threads
        self.metric = searched.recipe.evaluate.label
        self.defaults = searched.recipe.resolved()
        self.baselines: dict[str, Row] = {}
        self.reference: Reference | None = None
        """What each trial's latency is read against (:func:`~torchslim.search.reference.prepare_reference`)."""

    def start(self, trial: Any, number: int, earlier: list[Record]) -> Started | Record:
        """Trial ``number`` ready to run; or its record already (refused, or the values of an earlier trial)."""
        begin = time.perf_counter()
        chosen = sample(trial, self.searched.spec, self.searched.document.data, self.defaults)
        folder = trial_folder(number, chosen)
        self.log.info("search: trial %d: %s", number, describe_values(chosen))
        same = next((r for r in earlier if r.values == chosen), None)
        if same is not None:  # a discrete space sampled again: the recipe is the same, and so is the result
            self.log.info("search: trial %d has the values of trial %d: its result, not run again", number, same.number)
            return dataclasses.replace(same, number=number, seconds=0.0)
        try:
            recipe = self._recipe(number, chosen)
            return Started(number, chosen, folder, begin, recipe, self.baseline(recipe))
        except TorchslimError as exc:  # a refused value, a model that does not build with it
            return Record(number, chosen, folder, time.perf_counter() - begin, error=str(exc))

    def job(self, started: Started) -> Job:
        """The ``compare`` job that runs a started trial into its report folder."""
        recipe = started.recipe
        document = recipe.document
        assert document is not None  # validated from one
        out = self.searched.out / TRIALS_DIR / started.folder
        return Job(recipe.name, document, self.registry, out, started.baseline, self.threads, False, recipe)

    def rung(self, started: Started, index: int, document: Document) -> Started | Record:
        """``started`` ready to run as its cheap rung ``index`` runs it, from that rung's recipe ``document``."""
        begin, folder = time.perf_counter(), f"{started.folder}-rung{index}"
        try:
            recipe = validate(document, self.registry)
            return Started(started.number, started.values, folder, begin, recipe, self.baseline(recipe))
        except TorchslimError as exc:  # a recipe the cheap settings make invalid, a baseline that fails on its part
            return Record(started.number, started.values, folder, time.perf_counter() - begin, error=str(exc))

    def finish(self, started: Started, outcome: Outcome) -> Record:
        """The record of a trial that ran: its objectives and misses, or why it failed."""
        seconds = time.perf_counter() - started.start
        head = (started.number, started.values, started.folder, seconds)
        if outcome.report is None:
            return Record(*head, error=outcome.error)
        final = paired_latency(outcome.report.final.metrics, outcome.report, self.reference)
        base = started.baseline.metrics
        found = values(self.searched.spec.objectives, final, self.metric)
        kept, kept_base = kept_figures(final, self.metric), kept_figures(base, self.metric)
        if isinstance(found, str):
            return Record(*head, error=found, final=kept, baseline=kept_base)
        budget = self.searched.budget
        misses = budget.failures(final, base, self.metric) if budget else []
        excess = excesses(budget, final, base, self.metric) if budget else {}
        return Record(*head, None, kept, kept_base, found, misses, excess)

    def _recipe(self, number: int, chosen: dict[str, Any]) -> RecipeBase:
        searched = self.searched
        document = trial_document(searched.document, chosen, searched.recipe, f"{searched.recipe.name}-trial{number}")
        try:
            return validate(with_reference(self.shared(document), self.reference), self.registry)
        except RecipeError as exc:
            raise RecipeError([f"{p} (in search trial {number})" for p in exc.problems]) from None

    def shared(self, document: Document) -> Document:
        """Under parallel trials, each times and trains with its share of the cores (never more than it asked for),
        as ``compare --jobs`` shares them."""
        if self.threads is None:
            return document
        data = document.data
        metrics = data.setdefault("metrics", {})
        metrics["threads"] = min(metrics.get("threads") or self.searched.recipe.metrics.threads or self.threads, self.threads)
        if data.get("threads") is not None:
            data["threads"] = min(data["threads"], self.threads)
        return document

    def baseline(self, recipe: RecipeBase) -> Row:
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
