"""The search's Optuna study, kept in a journal file inside the output directory or in a database (``--storage``,
shared by several search processes): the one module that imports Optuna (``pip install 'torchslim[search]'``).

Determinism: each trial is sampled by a fresh sampler seeded from the search's seed and the trial's number (hashed
together: :func:`trial_seed`),
so what a trial samples depends only on the trials finished before it. A search killed mid-trial and resumed
marks the interrupted trial failed and asks for its values again, under the same trial number: it ends with
the trials an uninterrupted search would have run.

Numbering: a trial's number comes from Optuna's own, which the storage gives out one at a time (under its lock or
transaction): a fresh trial is numbered by its rank among the fresh trials, and the rerun of an interrupted trial
(a *replay*, queued with the interrupted trial's number) keeps that number. So processes sharing one storage never
give two trials one number. A running trial is only recovered by a process on its own host whose owner is gone:
another live process's trial is left alone.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import time
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
#: A trial's user attributes: its search number; set when queued as the rerun of an interrupted trial; its process.
NUMBER, REPLAY, OWNER = "torchslim_number", "torchslim_replay", "torchslim_owner"


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
    """The trials of one search, in ``DIR/study.journal`` or in the database at ``storage``."""

    def __init__(self, out: Path, spec: SearchSpec, recipe_fingerprint: str, resume: bool, storage: str | None = None) -> None:
        optuna = optuna_module()
        self._optuna, self._spec = optuna, spec
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        backend = _storage(optuna, out, storage, resume)
        self._study = optuna.create_study(
            study_name=STUDY_NAME, storage=backend, directions=directions(spec.objectives), load_if_exists=True
        )
        stored = self._study.user_attrs.get(RECIPE_ATTRIBUTE)
        if stored is None:
            self._study.set_user_attr(RECIPE_ATTRIBUTE, recipe_fingerprint)
        elif stored != recipe_fingerprint:
            raise OutputError(
                f"{storage or out}: holds a search of another recipe (only search.trials and search.minutes "
                f"may change on --resume); choose another --out" + (" or --storage" if storage else "")
            )

    def records(self) -> list[Record]:
        """The finished trials (ran, failed, or stopped after a cheap rung), by number."""
        state = self._optuna.trial.TrialState
        states = (state.COMPLETE, state.FAIL, state.PRUNED)
        found = [
            Record.from_attr(t.user_attrs[ATTRIBUTE])
            for t in self._study.get_trials(deepcopy=False, states=states)
            if ATTRIBUTE in t.user_attrs
        ]
        return sorted(found, key=lambda r: r.number)

    def spent_seconds(self) -> float:
        """The wall time the finished trials took, counted once where trials ran at the same time (``--jobs``): the
        union of their spans, each from when it was asked for its recorded seconds. A sum of their seconds counts
        a batch of N parallel trials N times, so a resumed parallel search believed its minutes spent."""
        state = self._optuna.trial.TrialState
        spans = [
            (t.datetime_start.timestamp(), t.user_attrs[ATTRIBUTE]["seconds"])
            for t in self._study.get_trials(deepcopy=False, states=(state.COMPLETE, state.FAIL, state.PRUNED))
            if ATTRIBUTE in t.user_attrs and t.datetime_start is not None
        ]
        return covered(spans)

    def recover(self, log: logging.Logger) -> None:
        """Trials a killed search left running: one that had finished its work is told its result; the others are
        marked failed and queued to run again under their number. Trials of a live process are left alone."""
        state = self._optuna.trial.TrialState
        for trial in self._study.get_trials(deepcopy=False, states=(state.RUNNING,)):
            if not _abandoned(trial.user_attrs.get(OWNER), trial.datetime_start):
                continue
            if ATTRIBUTE in trial.user_attrs:
                record = Record.from_attr(trial.user_attrs[ATTRIBUTE])
                self._finish(trial.number, record)
                continue
            number = trial.user_attrs.get(NUMBER) or _rank(trial.number, self._study.get_trials(deepcopy=False))
            if self.release(trial.number, number, trial.params):
                log.info(
                    "search: a trial was interrupted (%s); it runs again",
                    ", ".join(map(str, trial.params.values())) or "before sampling",
                )

    def next_number(self) -> int:
        """The number the next :meth:`ask` is likely to give (exact unless another process asks at the same time)."""
        trials = self._study.get_trials(deepcopy=False)
        waiting = [
            t.user_attrs[NUMBER] for t in trials if t.state == self._optuna.trial.TrialState.WAITING and NUMBER in t.user_attrs
        ]
        return min(waiting) if waiting else 1 + sum(1 for t in trials if not t.user_attrs.get(REPLAY))

    def enqueue_first(self, values: dict[str, Any]) -> None:
        """Ask for ``values`` (Optuna parameter names and values) as trial 1, in a study with no trial yet."""
        if not self._study.get_trials(deepcopy=False):
            self._study.enqueue_trial(values, user_attrs={NUMBER: 1})

    def ask(self) -> tuple[Any, int]:
        """A new Optuna trial and its search number, to be sampled by a sampler seeded for that number."""
        trial = self._study.ask()
        number = trial.user_attrs.get(NUMBER)
        if number is None:  # a fresh trial
            number = _rank(trial.number, self._study.get_trials(deepcopy=False))
            trial.set_user_attr(NUMBER, number)
        trial.set_user_attr(OWNER, self._owner)
        # Optuna samples when a value is suggested (relative samplers included): the sampler set now samples it.
        self._study.sampler = self._sampler(trial_seed(self._spec.seed, number))
        return trial, number

    def release(self, trial: Any, number: int, params: dict[str, Any] | None = None) -> bool:
        """End ``trial`` unrun and queue a rerun under its ``number`` (with ``params`` when it had sampled them);
        False when another process ended it first."""
        try:
            self._study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # already finished (another process recovered it): its rerun is queued
            return False
        self._study.enqueue_trial(params or {}, user_attrs={NUMBER: number, REPLAY: True})
        return True

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


def covered(spans: Sequence[tuple[float, float]]) -> float:
    """The length of the union of the spans, each ``(start, seconds)``."""
    total, reach = 0.0, float("-inf")
    for start, seconds in sorted(spans):
        end = start + seconds
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial ``number`` of a search seeded ``seed``: both hashed, so that searches with seeds 0,
    1 and 2 share no trial (with ``seed + number``, seed 1's trial 1 was seed 0's trial 2)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "little")


def _storage(optuna: Any, out: Path, url: str | None, resume: bool) -> Any:
    """The journal file in ``out``, or Optuna's database storage at ``url``; a study already there needs ``resume``."""
    if url is None:
        path = out / STUDY_FILE
        if path.exists() and not resume:
            raise OutputError(f"{out}: holds a search ({STUDY_FILE}); add --resume to continue it, or choose another --out")
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(path)))
    # SQLite serialises writers: several processes wait for the lock rather than fail at once.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        storage = _rdb(optuna, url, kwargs)
    except ImportError as exc:  # SQLAlchemy, or the database's driver (psycopg2 for postgresql://)
        raise UsageError(f"--storage {url}: {exc}") from None
    except Exception as exc:  # no such database, refused connection: SQLAlchemy's errors, in its words
        raise OutputError(f"--storage {url}: cannot open it: {exc}") from None
    if not resume and STUDY_NAME in optuna.study.get_all_study_names(storage):
        raise OutputError(
            f"--storage {url}: holds a search ({STUDY_NAME}); add --resume to continue it, or choose another --storage"
        )
    return storage


def _rdb(optuna: Any, url: str, kwargs: dict[str, Any], attempts: int = 5) -> Any:
    """Optuna's database storage at ``url``. Searches started together on a new database race to create its tables
    (one sees "table ... already exists" while another creates them): a failed open is tried again, and the
    tables are there by then."""
    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except ImportError:
            raise
        except Exception:
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _rank(number: int, trials: list[Any]) -> int:
    """The search number of the fresh trial that is Optuna's trial ``number``: its rank among the fresh trials up to it,
    in the order the storage created them (a replay keeps the number it was queued with)."""
    return 1 + sum(1 for t in trials if t.number < number and not t.user_attrs.get(REPLAY))


def _abandoned(owner: str | None, started: datetime.datetime | None) -> bool:
    """A running trial's process is gone: it ran on this host and its process no longer exists (a trial of another
    host cannot be checked from here, and is left running)."""
    if owner is None:  # killed before it recorded its owner (a moment after it was asked), or asked by an older version
        return started is None or datetime.datetime.now(started.tzinfo) - started > datetime.timedelta(minutes=1)
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def keeps(rank: int, others: Sequence[int], reduction_factor: int) -> bool:
    """Whether Optuna's ``SuccessiveHalvingPruner`` promotes a trial of ``rank`` at a rung where ``others`` (the
    ranks of the trials measured at that rung before it, lower is better) competed: replayed in a study in memory,
    so the decision depends on the search's records alone (the same after a resume)."""
    optuna = optuna_module()
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor, min_early_stopping_rate=0)
    study = optuna.create_study(direction="minimize", pruner=pruner)
    for value in others:  # each competitor reports its rank to the rung (step 1): the pruner keeps it for the rung
        competitor = study.ask()
        competitor.report(float(value), 1)
        competitor.should_prune()
        study.tell(competitor, float(value))
    trial = study.ask()
    trial.report(float(rank), 1)
    return not trial.should_prune()
