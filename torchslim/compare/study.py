"""``torchslim compare``: several recipes (and sweeps) run and measured side by side.

Each recipe is expanded into its variants and validated before anything runs. Variants that
share the model, data, evaluate metric, metrics options and seed share one baseline, measured
once; variants deployed to a runtime also share the original model deployed there in float32
(:mod:`.runtimes`), measured once per runtime. A variant whose report is already in the output
directory under the same resolved recipe hash, torch version, machine, CPU and thread count is
not run again. Variants run one after another, or in parallel processes with the CPU's threads
divided between them. Each variant is validated once in this process, and once more only in the
spawned process that runs it under parallel jobs.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..engine.checkpoints import CHECKPOINT_DIR
from ..engine.metrics import torch_threads
from ..engine.prepare import prepare
from ..engine.registry import Registry
from ..engine.report import Row
from ..engine.runner import baseline_row
from ..engine.tracking import check_tracking
from .budget import Budget, judge
from .executors import Executor, RayExecutor, make_executor
from .export import write_outputs
from .finished import baseline_key, finished_report
from .jobs import Job
from .pareto import fronts
from .plan import Plan, Planned, Source, plan
from .runtimes import RuntimeBaseline, measure_all, plan_runtimes
from .table import Comparison, Entry, Mode
from .tracked import log_comparison


def compare(
    sources: Sequence[Source],
    out: str | os.PathLike[str] | None = None,
    *,
    jobs: int = 1,
    executor: str = "local",
    track: str | None = None,
    registry: Registry | None = None,
    log: logging.Logger | None = None,
) -> Comparison:
    """Run every recipe of ``sources`` (paths, folders of ``*.yaml`` recipes, or mappings; sweeps expanded)
    and compare them.

    With ``out``, each variant's report directory and the comparison files (JSON, CSV,
    Markdown, HTML, PNG) are written there, and finished variants are reused on a repeat. ``executor``:
    ``local`` (this machine's processes) or ``ray[:ADDRESS]`` (:mod:`.executors`). ``track``: ``mlflow[:URI]``, the
    comparison and each variant logged as MLflow runs (:mod:`torchslim.engine.tracking`).
    """
    registry, log = registry or Registry.load(), log or logging.getLogger("torchslim")
    runner = make_executor(executor, jobs)
    if track is not None:
        check_tracking(track)
    ray = isinstance(runner, RayExecutor)  # Ray runs every variant its cluster has CPUs for; --jobs divides no cores
    study = plan(sources, out, min(jobs, 1) if ray else jobs, registry)
    if ray:
        study.mode.executor = runner.describe()
    start = time.perf_counter()
    comparison = _run_all(study, registry, runner, log)
    _judge(comparison, study.budget)
    log.info("compare: %d variant(s) done in %.1fs", len(study.planned), time.perf_counter() - start)
    if study.out_dir is not None:
        write_outputs(comparison, study.out_dir)
    if track is not None:
        name = study.out_dir.name if study.out_dir is not None else "compare"
        log.info("compare: logged to MLflow at %s", log_comparison(track, comparison, name))
    return comparison


def _run_all(study: Plan, registry: Registry, runner: Executor, log: logging.Logger) -> Comparison:
    planned, out_dir, mode = study.planned, study.out_dir, study.mode
    keys = [baseline_key(recipe) for _, recipe in planned]
    order = list(dict.fromkeys(keys))
    entries = [Entry(v.name, v.folder, v.source, v.values, order.index(k)) for (v, _), k in zip(planned, keys, strict=True)]
    if out_dir is not None:
        _reuse_finished(entries, planned, out_dir, log)
    baselines, measured = _baselines(planned, entries, keys, order, log)
    runtimes, runtimes_measured = _runtime_baselines(planned, entries, baselines, out_dir, registry, log)
    pending = [(e, p) for e, p in zip(entries, planned, strict=True) if not e.reused]
    jobs = [_job(p, registry, out_dir, baselines[e.group], mode) for e, p in pending]
    outcomes = runner.run(jobs, log)
    for (entry, _), outcome in zip(pending, outcomes, strict=True):
        entry.report, entry.error, entry.exit_code = outcome.report, outcome.error, outcome.exit_code
    groups = [[e.name for e in entries if e.group == g] for g in range(len(order))]
    return Comparison(
        study.metric,
        entries,
        baselines,
        groups,
        mode,
        baselines_measured=measured,
        out=out_dir,
        runtime_baselines=runtimes,
        runtime_baselines_measured=runtimes_measured,
    )


def _runtime_baselines(
    planned: list[Planned],
    entries: list[Entry],
    baselines: list[Row],
    out_dir: Path | None,
    registry: Registry,
    log: logging.Logger,
) -> tuple[list[RuntimeBaseline], int]:
    """The float32 baseline in each runtime a variant deploys to, and how many were measured here.

    Measured before the variants, like the torch baseline, with the metrics settings of the variants they serve.
    """
    runtimes, indices = plan_runtimes(planned, [e.group for e in entries], registry)
    for entry, index in zip(entries, indices, strict=True):
        entry.runtime_base = index
    return runtimes, measure_all(runtimes, baselines, out_dir, registry, log)


def _reuse_finished(entries: list[Entry], planned: list[Planned], out_dir: Path, log: logging.Logger) -> None:
    for entry, (_, recipe) in zip(entries, planned, strict=True):
        report = finished_report(out_dir / entry.folder, recipe, log)
        if report is not None:
            entry.report, entry.reused = report, True
            log.info(
                "compare: %s finished before with the same recipe hash and environment; reusing %s",
                entry.name,
                out_dir / entry.folder,
            )


def _job(planned: Planned, registry: Registry, out_dir: Path | None, baseline: Row, mode: Mode) -> Job:
    variant, recipe = planned
    folder = out_dir / variant.folder if out_dir is not None else None
    resume = folder is not None and (folder / CHECKPOINT_DIR).is_dir()  # an interrupted run continues
    return Job(variant.name, variant.document, registry, folder, baseline, mode.threads, resume, recipe)


def _baselines(
    planned: list[Planned], entries: list[Entry], keys: list[str], order: list[str], log: logging.Logger
) -> tuple[list[Row], int]:
    """One baseline row per group: from a reused report of the group, else measured once here."""
    rows: list[Row] = []
    measured = 0
    for key in order:
        members = [i for i, k in enumerate(keys) if k == key]
        reused = next((entries[i].report for i in members if entries[i].report is not None), None)
        if reused is not None:
            rows.append(copy.deepcopy(reused.baseline))
            continue
        recipe = planned[members[0]][1]
        log.info("compare: measuring the baseline of %s once, for %d variant(s)", entries[members[0]].name, len(members))
        with torch_threads(recipe.work_threads()):  # as torchslim.run builds and scores it
            ctx, model = prepare(recipe, log)
            rows.append(baseline_row(model, ctx, recipe.metrics))
        measured += 1
    return rows, measured


def _judge(comparison: Comparison, budget: Budget | None) -> None:
    """Mark the Pareto fronts, the budget's verdict per entry, and the best passing entry."""
    entries = comparison.entries
    baselines = [comparison.baselines[e.group].metrics for e in entries]
    for entry, marks in zip(entries, fronts([e.final for e in entries], comparison.metric, baselines), strict=True):
        entry.fronts = marks
    judge(comparison, budget)
