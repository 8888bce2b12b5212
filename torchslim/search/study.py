"""The search's Optuna study, kept in a journal file inside the output directory: the one module that imports
Optuna (``pip install 'torchslim[search]'``).

Determinism: each trial is sampled by a fresh sampler seeded with the search's seed plus the trial's number,
so what a trial samples depends only on the trials finished before it. A search killed mid-trial and resumed
marks the interrupted trial failed and asks for its values again, under the same trial number: it ends with
the trials an uninterrupted search would have run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine.errors import OutputError, UsageError
from ..engine.study_fields import SearchSpec
from .objectives import directions
from .records import ATTRIBUTE, Record

STUDY_FILE = "study.journal"
STUDY_NAME = "torchslim-search"
#: The study's user attribute holding what the search was started with (a resume must search the same).
RECIPE_ATTRIBUTE = "torchslim_recipe"


def optuna_module() -> Any:
    """Optuna, quiet (torchslim prints its own progress), or UsageError naming the extra to install."""
    try:
        import optuna
    except ImportError:
        raise UsageError("torchslim search needs Optuna: pip install 'torchslim[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def fingerprint(data: dict[str, Any]) -> str:
    """What a resumed search must share with the one it continues: the recipe, its budget aside (a search may
    be resumed with more trials or minutes)."""
    search = {k: v for k, v in (data.get("search") or {}).items() if k not in ("trials", "minutes")}
    return hashlib.sha256(json.dumps({**data, "search": search}, sort_keys=True, default=repr).encode()).hexdigest()


class Study:
    """The trials of one search, in ``DIR/study.journal``."""

    def __init__(self, out: Path, spec: SearchSpec, recipe_fingerprint: str, resume: bool) -> None:
        optuna = optuna_module()
        path = out / STUDY_FILE
        if path.exists() and not resume:
            raise OutputError(f"{out}: holds a search ({STUDY_FILE}); add --resume to continue it, or choose another --out")
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self._optuna, self._spec = optuna, spec
        storage = JournalStorage(JournalFileBackend(str(path)))
        self._study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=directions(spec.objectives),
                                          load_if_exists=True)
        stored = self._study.user_attrs.get(RECIPE_ATTRIBUTE)
        if stored is None:
            self._study.set_user_attr(RECIPE_ATTRIBUTE, recipe_fingerprint)
        elif stored != recipe_fingerprint:
            raise OutputError(f"{out}: holds a search of another recipe (only search.trials and search.minutes may change "
                              f"on --resume); choose another --out")

    def records(self) -> list[Record]:
        """The finished trials (ran, failed, or stopped after a cheap rung), by number."""
        state = self._optuna.trial.TrialState
        states = (state.COMPLETE, state.FAIL, state.PRUNED)
        found = [Record.from_attr(t.user_attrs[ATTRIBUTE]) for t in self._study.get_trials(deepcopy=False, states=states)
                 if ATTRIBUTE in t.user_attrs]
        return sorted(found, key=lambda r: r.number)

    def recover(self, log: logging.Logger) -> None:
        """Trials a killed search left running: one that had finished its work is told its result; the others are
        marked failed and their values asked for again."""
        state = self._optuna.trial.TrialState
        for trial in self._study.get_trials(deepcopy=False, states=(state.RUNNING,)):
            if ATTRIBUTE in trial.user_attrs:
                record = Record.from_attr(trial.user_attrs[ATTRIBUTE])
                self._finish(trial.number, record)
                continue
            self._study.tell(trial.number, state=state.FAIL)
            if trial.params:
                self._study.enqueue_trial(trial.params)
            log.info("search: a trial was interrupted (%s); it runs again", ", ".join(map(str, trial.params.values())) or
                     "before sampling")

    def ask(self, number: int) -> Any:
        """A new Optuna trial for the search's trial ``number``, sampled by a sampler seeded for it."""
        self._study.sampler = self._sampler(self._spec.seed + number)
        return self._study.ask()

    def tell(self, trial: Any, record: Record) -> None:
        """Store ``record`` with ``trial`` and end it: complete with its objectives, or failed."""
        for name, excess in record.excess.items():  # set before the record: a trial holding one has its constraints
            trial.set_constraint(name, excess)
        trial.set_user_attr(ATTRIBUTE, record.to_attr())
        self._finish(trial, record)

    def _finish(self, trial: Any, record: Record) -> None:
        if record.ok:
            self._study.tell(trial, record.objectives)
        elif record.stopped is not None:
            if len(self._spec.objectives) == 1 and not isinstance(trial, int):  # TPE ranks stopped trials by these
                for rung, figures in enumerate(record.rungs):
                    trial.report(figures["objectives"][0], rung)
            self._study.tell(trial, state=self._optuna.trial.TrialState.PRUNED)
        else:
            self._study.tell(trial, state=self._optuna.trial.TrialState.FAIL)

    def _sampler(self, seed: int) -> Any:
        samplers, spec = self._optuna.samplers, self._spec
        if spec.sampler == "random":
            return samplers.RandomSampler(seed=seed)
        if spec.sampler == "nsga2":
            return samplers.NSGAIISampler(seed=seed, population_size=spec.startup_trials)
        return samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)


def keeps(rank: int, others: Sequence[int], reduction_factor: int) -> bool:
    """Whether Optuna's ``SuccessiveHalvingPruner`` promotes a trial of ``rank`` at a rung where ``others`` (the
    ranks of the trials measured at that rung before it, lower is better) competed: replayed in a study in memory,
    so the decision depends on the search's records alone (the same after a resume)."""
    optuna = optuna_module()
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor,
                                                    min_early_stopping_rate=0)
    study = optuna.create_study(direction="minimize", pruner=pruner)
    for value in others:  # each competitor reports its rank to the rung (step 1): the pruner keeps it for the rung
        competitor = study.ask()
        competitor.report(float(value), 1)
        competitor.should_prune()
        study.tell(competitor, float(value))
    trial = study.ask()
    trial.report(float(rank), 1)
    return not trial.should_prune()
