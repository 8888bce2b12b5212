"""From the sources a user names to the variants a comparison runs: every recipe read, validated and
expanded (sweeps), the thread share of parallel jobs set, one metric checked, the output folder made safe.
Nothing runs here; every mistake is found before the first variant starts."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.errors import OutputError, UsageError
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.report import REPORT_JSON
from ..engine.saving import RECIPE_FILE
from ..engine.yamlio import Document, read_yaml
from .budget import Budget, merge
from .export import EXPORT_FILES
from .runtimes import FOLDER_PREFIX
from .sweep import Variant, expand, rebind
from .table import Mode

Source = str | os.PathLike[str] | Mapping[str, Any]
Planned = tuple[Variant, RecipeBase]


@dataclass(frozen=True)
class Plan:
    """What a comparison will run: its variants (each validated), and how."""

    planned: list[Planned]
    metric: str
    budget: Budget | None
    mode: Mode
    out_dir: Path | None


def plan(sources: Sequence[Source], out: str | os.PathLike[str] | None, jobs: int, registry: Registry) -> Plan:
    """Read, validate and expand ``sources`` (paths, folders of ``*.yaml`` recipes, or mappings)."""
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: give at least 1")
    files = [file for source in sources for file in _recipe_files(source)]
    if not files:
        raise UsageError("compare needs at least one recipe")
    documents = [_document(file) for file in files]
    bases = [validate(document, registry) for document in documents]
    mode = _mode(jobs)
    expanded = [p for d, b in zip(documents, bases, strict=True) for p in expand(d, b, registry)]
    planned = [_with_threads(p, mode.threads) for p in expanded]
    mode = _threads_used(mode, [recipe for _, recipe in planned])
    metric = _common_metric(planned)
    out_dir = _prepare_out(Path(out), planned) if out is not None else None
    return Plan(planned, metric, merge(bases), mode, out_dir)


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
            raise UsageError(
                f"two compared recipes or variants are both {kind} {', '.join(twice)}: give each recipe its own name"
            )
    return next(iter(labels))


def _prepare_out(out: Path, planned: list[Planned]) -> Path:
    """The output directory, refusing one that holds files other than a comparison's."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    own = set(EXPORT_FILES) | {variant.folder for variant, _ in planned}
    for path in out.iterdir() if out.exists() else []:
        ours = (
            path.name in own
            or path.name.startswith((".", FOLDER_PREFIX))
            or (path / REPORT_JSON).exists()
            or (path / RECIPE_FILE).exists()
        )
        if not ours:
            raise OutputError(f"{out}: holds {path.name}, which is not from a torchslim comparison; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out
