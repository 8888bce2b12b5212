"""A search's per-layer and per-group dimensions, generated from the model.

``stages.1.layer_bits: {per_layer: {choices: [1, 2, 4, 8]}}`` becomes one dimension per layer the stage
quantizes (``stages.1.layer_bits[features.0]``, ...), and ``stages.0.group_amounts: {per_group: {low: 0, high:
0.6}}`` one per group of coupled channels the prune would cut. A sensitivity pass (:mod:`.sensitivity`, cached in
the search's folder) measures each unit at the choices (or at amounts within the range); each unit's dimension
keeps the values whose loss alone could belong to an allocation better than the knapsack's (:mod:`.allocation`),
and the knapsack's allocation within the budget of the stage as written is the search's first trial. A trial's
unit values are gathered back into one mapping at the option's path (:func:`torchslim.search.space.fold`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from ..engine.errors import RecipeError
from ..engine.hooks import PerUnit
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.study_fields import SearchDimension
from .allocation import Option, allocate, bounds, stage_options
from .plan import SearchPlan
from .sensitivity import DEFAULT_SETTINGS, Sensitivity, measure
from .sensitivity_files import write_files
from .space import trial_document

_STAGE_OPTION = re.compile(r"^stages\.(\d+)\.(\w+)$")
_STAGE_PREFIX = re.compile(r"^stages\.(\d+)\.")


def expand(searched: SearchPlan, registry: Registry, log: logging.Logger) -> tuple[SearchPlan, dict[str, Any] | None]:
    """The plan with every per-unit dimension replaced by one per unit, and the first trial's values (None when
    the space has no per-unit dimension, or no allocation fits the budget)."""
    space: dict[str, SearchDimension] = {}
    first: dict[str, Any] = {}
    passes = Sensitivity(searched.recipe.name, "output error on the calibration data", 0, 0)
    for path, dimension in searched.spec.space.items():
        inner = dimension.per_layer or dimension.per_group
        if inner is None:
            space[path] = dimension
            continue
        units, seed = _expand_one(searched, path, dimension, inner, passes, log)
        space.update(units)
        first.update(seed)
    if not passes.stages:
        return searched, None
    write_files(searched.out, passes)
    spec = searched.spec.model_copy(update={"space": space})
    if first:
        _check_first(searched, first, registry)
    return dataclasses.replace(searched, spec=spec), first or None


def _expand_one(
    searched: SearchPlan, path: str, dimension: SearchDimension, inner: SearchDimension, passes: Sensitivity, log: logging.Logger
) -> tuple[dict[str, SearchDimension], dict[str, Any]]:
    recipe, where = searched.recipe, ("search", "space", path)
    index = _stage_index(recipe, path, dimension)
    stage = recipe.stages[index]
    assert isinstance(stage, PerUnit)
    settings = _settings(inner, stage.unit_setting)
    found = measure(recipe, searched.out, stages=[index], settings=settings, log=log)
    sens = found.stages[0]
    passes.stages.append(sens)
    passes.batches, passes.samples, passes.seconds = found.batches, found.samples, passes.seconds + found.seconds
    log.info(
        "search: sensitivity of %s: %d %s(s) x %d settings, %.1f s%s",
        stage.label,
        len(sens.units),
        stage.unit_kind,
        len(sens.settings),
        sens.seconds,
        " (cached)" if sens.cached else "",
    )
    options, capacity = stage_options(sens, inner.choices and [float(c) for c in inner.choices])
    options = {u: [o for o in opts if _within(o, inner)] for u, opts in options.items()}
    chosen = allocate(options, capacity)
    if chosen is None:
        log.info(
            "search: %s: no allocation of %s fits the budget of %s as written; no first trial from it",
            recipe.where(where),
            stage.unit_option,
            stage.label,
        )
    # The stage's own budget bounds a unit's settings only when nothing searched before it changes what the stage
    # weighs: a searched cut before a quantize frees bits that the budget as written does not know of.
    before = _searched_before(searched, index)
    if before and chosen:
        log.info("search: %s: settings not bounded by its budget as written (%s searched before it)", stage.label, before)
    room = None if before else capacity
    kept = bounds(options, chosen, room) if chosen else {u: [o.setting for o in opts] for u, opts in options.items()}
    whole = stage.unit_setting == "bits"
    units = {f"{path}[{u}]": _dimension(inner, kept[u], dimension, whole) for u in sens.units if kept.get(u)}
    seed = {f"{path}[{u}]": int(s) if whole else s for u, s in (chosen or {}).items()}
    return units, seed


def _searched_before(searched: SearchPlan, index: int) -> str:
    """The space's paths on stages before ``index``, comma-separated ('' when none)."""
    paths = [p for p in searched.spec.space if (m := _STAGE_PREFIX.match(p)) and int(m[1]) < index]
    return ", ".join(paths)


def _stage_index(recipe: RecipeBase, path: str, dimension: SearchDimension) -> int:
    """The stage whose per-unit option ``path`` names; RecipeError at the space entry otherwise."""
    where = recipe.where(("search", "space", path))
    match = _STAGE_OPTION.match(path)
    stages = recipe.stages
    if match is None or int(match[1]) >= len(stages) or not isinstance(stages[int(match[1])], PerUnit):
        able = [f"stages.{i}.{s.unit_option}" for i, s in enumerate(stages) if isinstance(s, PerUnit)]
        raise RecipeError(
            f"{where}: search.space.{path}: per_layer and per_group set a stage's per-unit option; "
            f"this recipe's are: {', '.join(able) or 'none (quantize binary/ternary/kbit, prune structured)'}"
        )
    stage = stages[int(match[1])]
    assert isinstance(stage, PerUnit)
    if match[2] != stage.unit_option:
        raise RecipeError(
            f"{where}: search.space.{path}: {stage.label} takes its per-{stage.unit_kind} values in "
            f"{stage.unit_option}: write stages.{match[1]}.{stage.unit_option}"
        )
    wanted = "per_layer" if stage.unit_kind == "layer" else "per_group"
    if getattr(dimension, wanted) is None:
        raise RecipeError(f"{where}: search.space.{path}: {stage.label} has one value per {stage.unit_kind}: write {wanted}")
    return int(match[1])


def _settings(inner: SearchDimension, kind: str) -> list[float]:
    """The settings the sensitivity pass tries: the choices, or the default amounts within the range."""
    if inner.choices is not None:
        return [float(c) for c in inner.choices]
    low, high = float(inner.low or 0.0), float(inner.high or 0.0)
    inside = [s for s in DEFAULT_SETTINGS[kind] if low <= s <= high and s > 0]
    return inside or [high]


def _within(option: Option, inner: SearchDimension) -> bool:
    if inner.choices is not None:
        return True
    return float(inner.low or 0.0) <= option.setting <= float(inner.high or 0.0)


def _dimension(inner: SearchDimension, kept: list[float], outer: SearchDimension, whole: bool) -> SearchDimension:
    """One unit's dimension: the kept choices, or the range up to the largest kept setting."""
    if inner.choices is not None:
        return SearchDimension(choices=[int(s) if whole else s for s in kept], when=outer.when)
    assert inner.low is not None
    high = max(kept)
    if high <= inner.low:
        return SearchDimension(choices=[inner.low], when=outer.when)
    return SearchDimension(low=inner.low, high=high, step=inner.step, when=outer.when)


def _check_first(searched: SearchPlan, first: dict[str, Any], registry: Registry) -> None:
    """The first trial's recipe validated now: a refused value is an error before any trial runs."""
    from .space import fold

    try:
        validate(trial_document(searched.document, fold(first), searched.recipe, searched.recipe.name), registry)
    except RecipeError as exc:
        raise RecipeError([f"{p} (the knapsack's first trial)" for p in exc.problems]) from None
