"""The search space: the values a trial samples, set into the recipe, and the space checked before a search.

Values are set in the recipe's data before validation, as a sweep's are (:func:`torchslim.compare.sweep.set_path`),
so a value a stage refuses is reported at the space entry that gave it. A dimension with ``when`` is sampled
only when the recipe (with the values sampled before it) holds the value it names.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import Any, Protocol

from ..compare.sweep import set_path
from ..engine.errors import RecipeError
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.study_fields import SearchDimension, SearchSpec
from ..engine.yamlio import Document

#: Keys of a search recipe that describe the search, dropped from each trial's recipe.
SEARCH_KEYS = ("search", "constraints")

_MISSING = object()


class Suggests(Protocol):
    """What a space samples from: an Optuna trial's ``suggest_*`` methods."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def sample(trial: Suggests, spec: SearchSpec, data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The values of one trial, by path, in the order of the space; a dimension whose ``when`` does not hold
    is left out. ``data`` is the recipe's data, ``defaults`` the validated recipe's (for a field left unwritten)."""
    values: dict[str, Any] = {}
    for path, dimension in spec.space.items():
        if active(dimension, values, data, defaults):
            values[path] = suggest(trial, path, dimension)
    return fold(values)


def size(spec: SearchSpec) -> int | None:
    """How many distinct trials the space holds, when it is finite and unconditional (choices, whole or stepped
    ranges, no ``when``); None otherwise."""
    count = 1
    for dimension in spec.space.values():
        if dimension.when is not None:
            return None
        if dimension.choices is not None:
            count *= len(dimension.choices)
            continue
        assert dimension.low is not None and dimension.high is not None
        step = dimension.step or (1 if dimension.is_int else None)
        if step is None:
            return None
        count *= math.floor((float(dimension.high) - float(dimension.low)) / float(step) + 1e-9) + 1
    return count


def fold(values: dict[str, Any]) -> dict[str, Any]:
    """Per-unit values (``stages.1.layer_bits[features.0]``: :mod:`.per_unit`) gathered into one mapping at their
    option's path (``stages.1.layer_bits: {features.0: 4, ...}``); other values as they are."""
    folded: dict[str, Any] = {}
    for path, value in values.items():
        option, bracket, unit = path.partition("[")
        if bracket and unit.endswith("]"):
            folded.setdefault(option, {})[unit[:-1]] = value
        else:
            folded[path] = value
    return folded


def suggest(trial: Suggests, path: str, dimension: SearchDimension) -> Any:
    """One value of ``dimension`` from ``trial``, named by its path."""
    if dimension.choices is not None:
        if all(isinstance(c, (bool, int, float, str)) or c is None for c in dimension.choices):
            return trial.suggest_categorical(path, dimension.choices)
        # Optuna's choices are scalars: lists and mappings are chosen by their JSON text
        return json.loads(trial.suggest_categorical(path, [json.dumps(c, sort_keys=True) for c in dimension.choices]))
    assert dimension.low is not None and dimension.high is not None  # the dimension's validator requires a range
    if dimension.is_int:
        return trial.suggest_int(path, int(dimension.low), int(dimension.high), step=int(dimension.step or 1), log=dimension.log)
    return trial.suggest_float(
        path,
        float(dimension.low),
        float(dimension.high),
        step=None if dimension.step is None else float(dimension.step),
        log=dimension.log,
    )


def active(dimension: SearchDimension, values: Mapping[str, Any], data: Any, defaults: Any) -> bool:
    """Whether each path of ``dimension.when`` holds its value: a value sampled before, else the recipe's."""
    for path, wanted in (dimension.when or {}).items():
        found = values[path] if path in values else get_path(data, path)
        if found is _MISSING:
            found = get_path(defaults, path)
        if found not in (wanted if isinstance(wanted, list) else [wanted]):
            return False
    return True


def get_path(data: Any, path: str) -> Any:
    """The value at the dotted ``path`` of plain data (``_MISSING`` where there is none)."""
    node = data
    for step in path.split("."):
        if isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        elif isinstance(node, dict) and step in node:
            node = node[step]
        else:
            return _MISSING
    return node


def trial_document(
    document: Document,
    values: Mapping[str, Any],
    recipe: RecipeBase,
    name: str,
    origins: Mapping[str, tuple[Any, ...]] | None = None,
) -> Document:
    """The recipe of one trial: ``document`` without the search, ``values`` set, named ``name``; a value is
    placed (for error messages) at its space entry, or where ``origins`` says it was written (a choice, a bound)."""
    data = {k: copy.deepcopy(v) for k, v in document.data.items() if k not in SEARCH_KEYS}
    positions = dict(document.positions)
    for path, value in values.items():
        entry = (origins or {}).get(path, ("search", "space", path))
        keys = set_path(data, path, value, recipe.where(entry))
        where, _ = document.position(entry)
        if where is not None:
            positions[keys] = where
    data["name"] = name
    return Document(data, document.source, positions)


def check_space(document: Document, recipe: RecipeBase, registry: Registry) -> None:
    """Before any trial: every value each dimension can give at its ends (the bounds, each choice) set into the
    recipe, with the values its ``when`` asks for, and validated; RecipeError at the space entry otherwise."""
    spec = recipe.search
    assert spec is not None
    problems: list[str] = []
    for path, dimension in spec.space.items():
        if dimension.per_layer is not None or dimension.per_group is not None:
            continue  # its units come from the model: per_unit.expand checks the first trial's values
        condition = {p: w[0] if isinstance(w, list) and w else w for p, w in (dimension.when or {}).items()}
        for origin, value in _ends(dimension):
            values = {**condition, path: value}
            try:
                validate(
                    trial_document(document, values, recipe, recipe.name, {path: ("search", "space", path, *origin)}), registry
                )
            except RecipeError as exc:
                problems += [f"{p} (search value {path}={json.dumps(value)})" for p in exc.problems]
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))


def _ends(dimension: SearchDimension) -> list[tuple[tuple[Any, ...], Any]]:
    """Each value to check, with where it is written in the dimension."""
    if dimension.choices is not None:
        return [(("choices", i), choice) for i, choice in enumerate(dimension.choices)]
    assert dimension.low is not None and dimension.high is not None
    kind = int if dimension.is_int else float
    return [(("low",), kind(dimension.low)), (("high",), kind(dimension.high))]
