"""``--track mlflow[:URI]``: runs, comparisons and searches logged to MLflow, read back from what they wrote.

Each run (a ``torchslim run``, a variant of a comparison, a trial of a search) is one MLflow run: the resolved
recipe as parameters (dotted paths), each stage's figures as metrics with the stage's index as the step (0: the
baseline), the runtime, CPU and threads as tags, its report files as artifacts. A comparison or a search is a parent
run holding its variants or trials, with its own files (comparison.*, front.*, best.yaml) as artifacts.

MLflow (``pip install 'torchslim[mlflow]'``) is imported by this module alone, when a tracker is opened. Without a
URI the store is a SQLite file beside the output folder (``mlflow.db``, artifacts in ``mlartifacts/``), so every
study written into one folder lands in one place. MLflow's own client does the logging: torchslim keeps no store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError, UsageError
from .report import REPORT_FILES, REPORT_JSON, Report

#: The experiment every torchslim run is logged under, unless ``MLFLOW_EXPERIMENT_NAME`` names another.
EXPERIMENT = "torchslim"
#: What a run's folder holds that is logged beside its report (the model weights are not: they can be large).
RUN_FILES = (*REPORT_FILES, "recipe.yaml")
_MISSING = "--track mlflow needs MLflow: pip install 'torchslim[mlflow]'"
_BATCH = 100  # MLflow takes at most 100 parameters per log_batch


class Tracker:
    """An MLflow experiment, and the runs torchslim logs into it."""

    def __init__(self, uri: str, artifacts: str | None) -> None:
        mlflow = mlflow_module()
        self.uri = uri
        self._entities = mlflow.entities
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        name = _experiment_name()
        found = self._client.get_experiment_by_name(name)
        self.experiment = found.experiment_id if found else self._client.create_experiment(name, artifacts)

    def start(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
        """A new run (under ``parent``); its id."""
        tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
        return str(self._client.create_run(self.experiment, run_name=name, tags=tags).info.run_id)

    def log_run(
        self,
        name: str,
        folder: Path | None,
        report: Report | None = None,
        parent: str | None = None,
        error: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """One run: its ``report`` (by default, the one in ``folder``), the files of ``folder``; failed with ``error``,
        or when there is no report. Its id."""
        if report is None and folder is not None and (folder / REPORT_JSON).is_file():
            report = Report.read(folder)
        run = self.start(name, parent, {**(tags or {}), **(_tags(report) if report else {})})
        if report is not None:
            self._log_report(run, report)
        if error is not None:
            self._client.set_tag(run, "torchslim.error", error[:5000])
        if folder is not None:
            self.log_files(run, (folder / f for f in RUN_FILES))
        self.end(run, failed=error is not None or report is None)
        return run

    def log_files(self, run: str, paths: Iterable[Path]) -> None:
        """The files of ``paths`` that exist, as artifacts of ``run``."""
        for path in paths:
            if path.is_file():
                self._client.log_artifact(run, str(path))

    def end(self, run: str, failed: bool = False) -> None:
        """Mark ``run`` finished (or failed)."""
        self._client.set_terminated(run, "FAILED" if failed else "FINISHED")

    def _log_report(self, run: str, report: Report) -> None:
        entities = self._entities
        params = [entities.Param(k, v) for k, v in _flat(report.recipe)]
        metrics = [
            entities.Metric(f"{_key(k)}", float(v), 0, step)
            for step, row in enumerate(report.rows)
            for k, v in row.metrics.items()
            if _number(v)
        ]
        for start in range(0, max(len(params), len(metrics)), _BATCH):
            self._client.log_batch(run, metrics=metrics[start : start + _BATCH], params=params[start : start + _BATCH])


def check_tracking(spec: str) -> str:
    """The URI of ``--track`` ``mlflow`` or ``mlflow:URI`` ("" without one), MLflow imported: UsageError before anything
    runs for another tracker or a missing extra."""
    kind, _, uri = spec.partition(":")
    if kind != "mlflow":
        raise UsageError(
            f"--track {spec}: expected mlflow or mlflow:URI (e.g. mlflow:sqlite:///mlflow.db, mlflow:http://server:5000)"
        )
    mlflow_module()
    return uri


def open_tracker(spec: str, out: Path | None) -> Tracker:
    """``mlflow`` or ``mlflow:URI`` (``--track``) as a tracker; without a URI, a store beside ``out``."""
    uri = check_tracking(spec)
    if uri:
        return Tracker(uri, None)
    place = out.resolve().parent if out is not None else Path.cwd()
    try:
        place.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--track mlflow: cannot make {place} for its store: {exc}") from None
    return Tracker(f"sqlite:///{place / 'mlflow.db'}", (place / "mlartifacts").as_uri())


def mlflow_module() -> Any:
    """MLflow, or UsageError naming the extra to install."""
    try:
        import mlflow
    except ImportError:
        raise UsageError(_MISSING) from None
    return mlflow


def _experiment_name() -> str:
    import os

    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def _tags(report: Report) -> dict[str, str]:
    """The runtime, CPU, threads and versions a report was measured with."""
    env, final = report.environment, report.final.metrics
    keys = ("cpu", "cpus", "threads", "work_threads", "device", "torch", "torchslim", "recipe_hash", "load_before")
    tags = {f"torchslim.{k}": str(env[k]) for k in keys if env.get(k) is not None}
    tags["torchslim.runtime"] = str(final.get("runtime") or "torch")
    return tags


def _flat(data: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``stages.0.amount`` -> ``0.5``: the recipe's leaves by dotted path, as MLflow's parameters (strings)."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _flat(value, f"{prefix}{key}.")
    elif isinstance(data, list) and data and any(isinstance(v, dict | list) for v in data):
        for index, value in enumerate(data):
            yield from _flat(value, f"{prefix}{index}.")
    else:
        yield _key(prefix.rstrip(".")), json.dumps(data)[:6000] if not isinstance(data, str) else data[:6000]


def _key(name: str) -> str:
    """A name MLflow takes: letters, digits and ``_-. /`` only."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)[:250]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # NaN is not logged
