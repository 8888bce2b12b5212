"""Sweep expansion: one recipe with ``sweep:`` becomes one concrete, validated recipe per variant.

Values are set in the recipe's data before validation, so a value that a stage refuses is
reported like any recipe error, at the position of that value in the ``sweep`` list. Each
variant is validated once; a plain recipe (no sweep) is its own variant and is not validated again.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..engine.errors import RecipeError
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.yamlio import Document

#: Keys of a recipe that describe the comparison and are dropped from each variant.
COMPARISON_KEYS = ("sweep", "sweep_mode", "constraints")


@dataclass(frozen=True)
class Variant:
    """One recipe to run in a comparison: a plain recipe, or one point of a sweep."""

    name: str
    """Shown in tables: the recipe's name, plus ``[path=value, ...]`` for a sweep variant."""
    folder: str
    """Directory name of its report under the comparison's output directory."""
    source: str
    """The recipe file it comes from (``<recipe>`` for a mapping)."""
    values: dict[str, Any]
    """The swept values, by dotted path (empty for a plain recipe)."""
    document: Document
    """The variant's recipe data (no sweep, no constraints), with the positions of the file."""


def expand(document: Document, recipe: RecipeBase, registry: Registry) -> list[tuple[Variant, RecipeBase]]:
    """The variants of ``recipe`` (itself alone without a sweep), each validated against ``registry``.

    ``recipe`` is ``document`` validated; a sweep's variants are validated here, one time each.
    """
    base = {k: v for k, v in document.data.items() if k not in COMPARISON_KEYS}
    if not recipe.sweep:
        plain = Document(base, document.source, document.positions)
        concrete = rebind(recipe, plain, {"sweep": None, "sweep_mode": "grid", "constraints": None})
        return [(Variant(recipe.name, folder_name(recipe.name), document.source, {}, plain), concrete)]
    return [_variant(document, recipe, base, values, registry) for values in combinations(recipe)]


def rebind(recipe: RecipeBase, document: Document, update: dict[str, Any]) -> RecipeBase:
    """A copy of the validated ``recipe`` with ``update`` applied and ``document`` as its source.

    Only for updates that are valid by construction and that no other field's validation
    depends on (the comparison fields, a thread count): validating ``document`` again would
    give the same recipe, at the cost of a whole validation pass per variant.
    """
    return recipe.rebound(document, update)


def combinations(recipe: RecipeBase) -> Iterator[dict[str, tuple[int, Any]]]:
    """Each variant's values as ``{path: (index in its list, value)}``, in grid or zip order."""
    sweep = recipe.sweep or {}
    paths = list(sweep)
    indexed = [list(enumerate(sweep[p])) for p in paths]
    rows = zip(*indexed, strict=True) if recipe.sweep_mode == "zip" else itertools.product(*indexed)
    for row in rows:
        yield dict(zip(paths, row, strict=True))


def _variant(
    document: Document, recipe: RecipeBase, base: dict[str, Any], values: dict[str, tuple[int, Any]], registry: Registry
) -> tuple[Variant, RecipeBase]:
    data = copy.deepcopy(base)
    positions = dict(document.positions)
    for path, (index, value) in values.items():
        keys = set_path(data, path, value, recipe.where(("sweep", path, index)))
        # A refused value is reported where the user wrote it: in the sweep list.
        if ("sweep", path, index) in positions:
            positions[keys] = positions[("sweep", path, index)]
    plain = {path: value for path, (_, value) in values.items()}
    name = f"{recipe.name}[{', '.join(f'{p}={format_value(v)}' for p, v in plain.items())}]"
    data["name"] = name
    variant = Document(data, document.source, positions)
    try:
        validated = validate(variant, registry)
    except RecipeError as exc:
        raise RecipeError([f"{problem} (in sweep variant {name})" for problem in exc.problems]) from None
    return Variant(name, folder_name(name), document.source, plain, variant), validated


def set_path(data: dict[str, Any], path: str, value: Any, where: str) -> tuple[Any, ...]:
    """Set ``value`` at the dotted ``path`` of the recipe data; return the path as keys.

    Missing mappings on the way are created (``metrics.runs`` without ``metrics:``); list
    indexes must exist. RecipeError at ``where`` otherwise.
    """
    node: Any = data
    keys: list[Any] = []
    steps = path.split(".")
    for depth, step in enumerate(steps):
        last = depth == len(steps) - 1
        if isinstance(node, list):
            if not step.isdigit() or int(step) >= len(node):
                raise RecipeError(
                    f"{where}: sweep: '{path}': {'.'.join(steps[:depth]) or 'the recipe'} has "
                    f"{len(node)} entries; '{step}' is not an index of it"
                )
            key: Any = int(step)
        elif isinstance(node, dict):
            key = step
            if not last and key not in node:
                node[key] = {}
        else:
            raise RecipeError(
                f"{where}: sweep: '{path}': {'.'.join(steps[:depth])} is {json.dumps(node)}, not a mapping or a list"
            )
        keys.append(key)
        if last:
            node[key] = copy.deepcopy(value)
        else:
            node = node[key]
    return tuple(keys)


def format_value(value: Any) -> str:
    """A swept value as written in a variant's name: strings bare, anything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def folder_name(name: str) -> str:
    """A directory name for ``name``: characters a shell would trip on become ``_``."""
    return re.sub(r"[^\w.=+-]+", "_", name).strip("_.") or "variant"
