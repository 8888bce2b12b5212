"""Before the first trial: the search recipe read and validated, its space checked against the recipe, the
figures its objectives and constraints need known to be measured, and the output folder made safe."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compare.budget import Budget
from ..engine.checks import check_recipe_code
from ..engine.errors import OutputError, RecipeError, UsageError
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.study_fields import SearchSpec
from ..engine.yamlio import Document, read_yaml
from .files import FILES
from .rungs import check_rungs
from .space import check_space
from .study import STUDY_FILE

#: What the output folder of a search holds besides these files: one report directory per trial.
TRIALS_DIR = "trials"
#: The run folder of a search's latency reference, and the file that keeps its latency across a resume.
REFERENCE_DIR, REFERENCE_FILE = "reference", "reference.json"
#: Objectives and limits that need latency measured, and those that need the other figures.
_NEEDS_LATENCY = ({"latency"}, {"max_latency_ms", "min_speedup"})
_NEEDS_FIGURES = ({"size", "packed_size", "macs"}, {"max_size_mb", "max_packed_mb", "max_macs", "min_size_ratio"})

Source = str | os.PathLike[str] | Mapping[str, Any]


@dataclass(frozen=True)
class SearchPlan:
    """A validated search recipe and where its search is kept."""

    document: Document
    recipe: RecipeBase
    spec: SearchSpec
    budget: Budget | None
    out: Path


def plan(source: Source, out: str | os.PathLike[str], jobs: int, registry: Registry, check_code: bool = True) -> SearchPlan:
    """Read and check a search recipe; RecipeError (located) or UsageError before anything runs."""
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: give at least 1")
    document = Document(dict(source), "<recipe>") if isinstance(source, Mapping) else read_yaml(source)
    recipe = validate(document, registry)
    if recipe.search is None:
        raise RecipeError(
            f"{recipe.where(())}: no search: block; torchslim search needs one "
            f"(the space, objectives and budget: see docs/search.md), torchslim run runs a plain recipe"
        )
    check_search(document, recipe, registry)
    if check_code:
        check_recipe_code(recipe)
    budget = Budget(**recipe.constraints.given()) if recipe.constraints and recipe.constraints.given() else None
    return SearchPlan(document, recipe, recipe.search, budget, _prepare_out(Path(out)))


def check_search(document: Document, recipe: RecipeBase, registry: Registry) -> None:
    """The checks of a search recipe's ``search:`` block that ``torchslim search`` and ``torchslim validate`` both
    make (RecipeError at the line): its figures measured, its space's values valid, its rungs possible."""
    assert recipe.search is not None
    _check_measured(recipe, recipe.search)
    _check_reference_scale(recipe, recipe.search)
    check_space(document, recipe, registry)
    check_rungs(recipe)


def reads_latency(recipe: RecipeBase, spec: SearchSpec) -> bool:
    """The search reads latency: an objective, or a limit of the recipe's constraints."""
    return bool(_asked(recipe, spec, _NEEDS_LATENCY))


def _asked(recipe: RecipeBase, spec: SearchSpec, needs: tuple[set[str], set[str]]) -> list[str]:
    """The objectives and limits of the search among ``needs`` (objectives, limits), sorted."""
    objectives, limits = needs
    given = set(recipe.constraints.given()) if recipe.constraints else set()
    return sorted((set(spec.objectives) & objectives) | (given & limits))


def _check_measured(recipe: RecipeBase, spec: SearchSpec) -> None:
    """An objective or limit whose figure the recipe turns off is an error at the objective."""
    off = [
        (_NEEDS_LATENCY, "metrics.latency", recipe.metrics.collect and recipe.metrics.latency),
        (_NEEDS_FIGURES, "metrics.collect", recipe.metrics.collect),
    ]
    for needs, switch, measured in off:
        wanted = _asked(recipe, spec, needs)
        if wanted and not measured:
            raise RecipeError(
                f"{recipe.where(('search', 'objectives'))}: search: {', '.join(wanted)} needs "
                f"{switch} on, and the recipe turns it off"
            )


#: Measurement settings the latency reference is timed at once (the recipe's): a trial at another value would read
#: its paired ratio at its own setting against the reference's latency at the recipe's.
_REFERENCE_SCALE = ("metrics.batch_size", "metrics.threads")


def _check_reference_scale(recipe: RecipeBase, spec: SearchSpec) -> None:
    """A searched batch or thread count with the latency reference on is an error at the space entry."""
    if not (spec.latency_reference and reads_latency(recipe, spec)):
        return
    for path in _REFERENCE_SCALE:
        if path in spec.space:
            raise RecipeError(
                f"{recipe.where(('search', 'space', path))}: search: {path} is searched, but each trial's latency "
                f"is read against a reference timed once at the recipe's own {path}; set search.latency_reference: "
                f"false to time each trial alone at its {path}"
            )


def _prepare_out(out: Path) -> Path:
    """The output folder, refusing one that holds files other than a search's."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    own = {*FILES, TRIALS_DIR, STUDY_FILE, REFERENCE_DIR, REFERENCE_FILE}
    for path in out.iterdir() if out.exists() else []:
        if not (path.name in own or path.name.startswith((".", STUDY_FILE, "sensitivity"))):
            raise OutputError(f"{out}: holds {path.name}, which is not from a torchslim search; choose another --out")
    (out / TRIALS_DIR).mkdir(parents=True, exist_ok=True)
    return out
