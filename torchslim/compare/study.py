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
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine.checkpoints import CHECKPOINT_DIR, recipe_hash
from ..engine.environment import environment
from ..engine.errors import OutputError, UsageError
from ..engine.metrics import measure, torch_threads
from ..engine.prepare import prepare
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.report import Report, Row
from ..engine.saving import MODEL_FILE
from ..engine.yamlio import Document, read_yaml
from .budget import Budget, judge, merge
from .export import EXPORT_FILES, write_outputs
from .jobs import Job, Outcome, execute, run_parallel
from .pareto import fronts
from .runtimes import FOLDER_PREFIX, RuntimeBaseline, measure_all, plan
from .sweep import Variant, expand, rebind
from .table import Comparison, Entry, Mode

Source = str | os.PathLike[str] | Mapping[str, Any]
Planned = tuple[Variant, RecipeBase]


def compare(sources: Sequence[Source], out: str | os.PathLike[str] | None = None, *, jobs: int = 1,
            registry: Registry | None = None, log: logging.Logger | None = None) -> Comparison:
    """Run every recipe of ``sources`` (paths, folders of ``*.yaml`` recipes, or mappings; sweeps expanded)
    and compare them.

    With ``out``, each variant's report directory and the comparison files (JSON, CSV,
    Markdown, HTML, PNG) are written there, and finished variants are reused on a repeat.
    """
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: give at least 1")
    sources = [file for source in sources for file in _recipe_files(source)]
    if not sources:
        raise UsageError("compare needs at least one recipe")
    registry, log = registry or Registry.load(), log or logging.getLogger("torchslim")
    documents = [_document(source) for source in sources]
    bases = [validate(document, registry) for document in documents]
    mode = _mode(jobs)
    expanded = [p for d, b in zip(documents, bases, strict=True) for p in expand(d, b, registry)]
    planned = [_with_threads(p, mode.threads) for p in expanded]
    mode = _threads_used(mode, [recipe for _, recipe in planned])
    metric, budget = _common_metric(planned), merge(bases)
    out_dir = _prepare_out(Path(out), planned) if out is not None else None
    start = time.perf_counter()
    comparison = _run_all(planned, out_dir, mode, metric, registry, log)
    _judge(comparison, budget)
    log.info("compare: %d variant(s) done in %.1fs", len(planned), time.perf_counter() - start)
    if out_dir is not None:
        write_outputs(comparison, out_dir)
    return comparison


def _recipe_files(source: Source) -> list[Source]:
    """A folder stands for its ``*.yaml`` recipes, in name order (``torchslim compare recipes/compare/runtimes/``)."""
    if isinstance(source, Mapping) or not Path(source).is_dir():
        return [source]
    files: list[Source] = [*sorted(Path(source).glob("*.yaml"))]
    if not files:
        raise UsageError(f"{source}: a folder without any .yaml recipe")
    return files


def _document(source: Source) -> Document:
    return Document(dict(source), "<recipe>") if isinstance(source, Mapping) else read_yaml(source)


def _mode(jobs: int) -> Mode:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform (macOS)
        cores = os.cpu_count() or 1
    return Mode(jobs, cores, max(1, cores // jobs) if jobs > 1 else None)


def _threads_used(mode: Mode, recipes: list[RecipeBase]) -> Mode:
    """``mode`` with the thread counts the recipes will use, outside and inside timing (for its description)."""
    work = sorted({recipe.work_threads() for recipe in recipes})
    timing = sorted({recipe.metrics.threads or torch.get_num_threads() for recipe in recipes})
    return dataclasses.replace(mode, work_threads=tuple(work), timing_threads=tuple(timing))


def _with_threads(planned: Planned, threads: int | None) -> Planned:
    """Under parallel jobs, time and train each variant with its share of the cores (never more than it asked for).

    The share goes into the document (what a worker process validates) and into the recipe
    validated here; a thread count cannot make a valid recipe invalid, so it is not validated again.
    A recipe's own ``threads`` (outside timing) is lowered to the share too; left null, it follows ``metrics.threads``.
    """
    variant, recipe = planned
    if threads is None:
        return planned
    share = min(recipe.metrics.threads or threads, threads)
    data = copy.deepcopy(variant.document.data)
    data.setdefault("metrics", {})["threads"] = share
    update: dict[str, Any] = {"metrics": recipe.metrics.model_copy(update={"threads": share})}
    if recipe.threads is not None:
        data["threads"] = update["threads"] = min(recipe.threads, threads)
    document = Document(data, variant.document.source, variant.document.positions)
    return dataclasses.replace(variant, document=document), rebind(recipe, document, update)


def _common_metric(planned: list[Planned]) -> str:
    labels = {recipe.evaluate.label: variant.source for variant, recipe in planned}
    if len(labels) > 1:
        listed = ", ".join(f"{label} ({source})" for label, source in labels.items())
        raise UsageError(f"the recipes are scored with different metrics: {listed}; compare recipes with one evaluate metric")
    for kind, names in (("named", [v.name for v, _ in planned]), ("stored in the folder", [v.folder for v, _ in planned])):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UsageError(f"two compared recipes or variants are both {kind} {', '.join(twice)}: "
                             f"give each recipe its own name")
    return next(iter(labels))


def _prepare_out(out: Path, planned: list[Planned]) -> Path:
    """The output directory, refusing one that holds files other than a comparison's."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    own = set(EXPORT_FILES) | {variant.folder for variant, _ in planned}
    for path in out.iterdir() if out.exists() else []:
        ours = (path.name in own or path.name.startswith((".", FOLDER_PREFIX)) or (path / "report.json").exists()
                or (path / "recipe.yaml").exists())
        if not ours:
            raise OutputError(f"{out}: holds {path.name}, which is not from a torchslim comparison; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def baseline_key(recipe: RecipeBase) -> str:
    """What a baseline depends on: recipes with the same key measure the same unchanged model."""
    data = recipe.resolved()
    shared = {k: data.get(k) for k in ("model", "data", "evaluate", "metrics", "seed", "device", "threads")}
    shared["base_dir"] = str(recipe.base_dir)  # a relative model checkpoint depends on it
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()


#: Environment facts a reused report must share with this run: its figures (latency above all)
#: hold only for the same torch, machine, CPU model and thread count.
SAME_ENVIRONMENT = ("torch", "machine", "cpu", "threads")


def environment_change(then: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """What differs between a report's environment and this run's (``torch 2.12 -> 2.13``), or None."""
    changed = [f"{key} {then.get(key)} -> {now.get(key)}" for key in SAME_ENVIRONMENT if then.get(key) != now.get(key)]
    return ", ".join(changed) or None


def finished_report(folder: Path, recipe: RecipeBase, log: logging.Logger | None = None) -> Report | None:
    """The report of a finished run of exactly ``recipe`` in ``folder`` (same recipe hash) in this
    environment (same torch version, machine, CPU and thread count), or None."""
    try:
        data = json.loads((folder / "report.json").read_text())
        if data["environment"]["recipe_hash"] != recipe_hash(recipe) or not (folder / MODEL_FILE).exists():
            return None
        change = environment_change(data["environment"], environment(recipe))
        if change is not None:
            (log or logging.getLogger("torchslim")).info("compare: %s ran under another environment (%s): running "
                                                         "it again", folder.name, change)
            return None
        rows = [Row.from_dict(r) for r in data["rows"]]
        return Report(data["recipe"], data["metric"], rows, list(data["notes"]), data["environment"])
    except (OSError, ValueError, KeyError, TypeError):  # missing, half-written by hand, or another format: run again
        return None


def _run_all(planned: list[Planned], out_dir: Path | None, mode: Mode, metric: str, registry: Registry,
             log: logging.Logger) -> Comparison:
    keys = [baseline_key(recipe) for _, recipe in planned]
    order = list(dict.fromkeys(keys))
    entries = [Entry(v.name, v.folder, v.source, v.values, order.index(k)) for (v, _), k in zip(planned, keys, strict=True)]
    if out_dir is not None:
        _reuse_finished(entries, planned, out_dir, log)
    baselines, measured = _baselines(planned, entries, keys, order, log)
    runtimes, runtimes_measured = _runtime_baselines(planned, entries, baselines, out_dir, registry, log)
    pending = [(e, p) for e, p in zip(entries, planned, strict=True) if not e.reused]
    jobs = [_job(p, registry, out_dir, baselines[e.group], mode) for e, p in pending]
    if mode.jobs > 1:
        outcomes = run_parallel(jobs, mode.jobs, log)
    else:
        outcomes = [_sequential(job, i, len(jobs), log) for i, job in enumerate(jobs)]
    for (entry, _), outcome in zip(pending, outcomes, strict=True):
        entry.report, entry.error, entry.exit_code = outcome.report, outcome.error, outcome.exit_code
    groups = [[e.name for e in entries if e.group == g] for g in range(len(order))]
    return Comparison(metric, entries, baselines, groups, mode, baselines_measured=measured, out=out_dir,
                      runtime_baselines=runtimes, runtime_baselines_measured=runtimes_measured)


def _runtime_baselines(planned: list[Planned], entries: list[Entry], baselines: list[Row], out_dir: Path | None,
                       registry: Registry, log: logging.Logger) -> tuple[list[RuntimeBaseline], int]:
    """The float32 baseline in each runtime a variant deploys to, and how many were measured here.

    Measured before the variants, like the torch baseline, with the metrics settings of the variants they serve.
    """
    runtimes, indices = plan(planned, [e.group for e in entries], registry)
    for entry, index in zip(entries, indices, strict=True):
        entry.runtime_base = index
    return runtimes, measure_all(runtimes, baselines, out_dir, registry, log, finished_report)


def _reuse_finished(entries: list[Entry], planned: list[Planned], out_dir: Path, log: logging.Logger) -> None:
    for entry, (_, recipe) in zip(entries, planned, strict=True):
        report = finished_report(out_dir / entry.folder, recipe, log)
        if report is not None:
            entry.report, entry.reused = report, True
            log.info("compare: %s finished before with the same recipe hash and environment; reusing %s", entry.name,
                     out_dir / entry.folder)


def _job(planned: Planned, registry: Registry, out_dir: Path | None, baseline: Row, mode: Mode) -> Job:
    variant, recipe = planned
    folder = out_dir / variant.folder if out_dir is not None else None
    resume = folder is not None and (folder / CHECKPOINT_DIR).is_dir()  # an interrupted run continues
    return Job(variant.name, variant.document, registry, folder, baseline, mode.threads, resume, recipe)


def _sequential(job: Job, index: int, total: int, log: logging.Logger) -> Outcome:
    log.info("compare: [%d/%d] %s: running", index + 1, total, job.name)
    return execute(job, log)


def _baselines(planned: list[Planned], entries: list[Entry], keys: list[str], order: list[str],
               log: logging.Logger) -> tuple[list[Row], int]:
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
            figures = {**measure(model, ctx, recipe.metrics, seconds=0.0).to_dict(), **ctx.validation_figures(model)}
        rows.append(Row("baseline", None, figures))
        measured += 1
    return rows, measured


def _judge(comparison: Comparison, budget: Budget | None) -> None:
    """Mark the Pareto fronts, the budget's verdict per entry, and the best passing entry."""
    entries = comparison.entries
    baselines = [comparison.baselines[e.group].metrics for e in entries]
    for entry, marks in zip(entries, fronts([e.final for e in entries], comparison.metric, baselines), strict=True):
        entry.fronts = marks
    judge(comparison, budget)
