"""What ``torchslim validate`` checks beyond a recipe's shape: the code and the files it names.

Each ``module:callable`` imports and takes the recipe's ``kwargs`` (bound to its signature, not
called), each ``checkpoint`` file exists, ``metrics.reference`` holds a saved model, and each stage's
optional backend imports. Everything runs with the recipe's directory importable, as a run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .prepare import located, metric_function
from .problems import format_path
from .recipe import RecipeBase
from .reference import check_reference
from .specs import DataSpec, ModelSpec, import_target
from .usercode import importable, kwargs_problem


def check_recipe_code(recipe: RecipeBase) -> None:
    """RecipeError, located, for the first target that does not import or bind, a missing checkpoint,
    or a stage whose optional backend does not import."""
    with importable(recipe.base_dir):
        for path, spec in _specs(recipe):
            _check_spec(recipe, path, spec)
        metric_function(recipe)
        for index, stage in enumerate(recipe.stage_list):
            _check_stage(recipe, index, stage)
    check_reference(recipe)


def _specs(recipe: RecipeBase) -> Iterator[tuple[tuple[Any, ...], ModelSpec | DataSpec]]:
    yield ("model",), recipe.model
    yield ("data",), recipe.data
    for index, stage in enumerate(recipe.stage_list):  # distill's teacher and student, a plugin's own specs
        for name, value in stage:
            if isinstance(value, (ModelSpec, DataSpec)):
                yield ("stages", index, name), value


def _check_spec(recipe: RecipeBase, path: tuple[Any, ...], spec: ModelSpec | DataSpec) -> None:
    label = format_path(path)
    with located(recipe, path + ("target",)):
        factory = import_target(spec.target, f"{label}.target")
    problem = kwargs_problem(factory, spec.target, spec.kwargs, label)
    if problem is not None:
        raise RecipeError(f"{recipe.where(path + problem[0][1:])}: {problem[1]}")
    checkpoint = getattr(spec, "checkpoint", None)
    if checkpoint is not None:
        file = Path(checkpoint) if recipe.base_dir is None else recipe.base_dir / checkpoint
        if not file.is_file():
            raise RecipeError(
                f"{recipe.where(path + ('checkpoint',))}: {label}.checkpoint: file not found: {file} "
                "(a relative path is taken from the recipe's directory)"
            )


def _check_stage(recipe: RecipeBase, index: int, stage: Any) -> None:
    # A stage may say whether what it needs beyond torch is there (a backend that is an optional
    # package); the run would only find out when the stage starts.
    try:
        stage.check_environment()
    except Exception as exc:  # the plugin's check says what is missing in its message
        raise RecipeError(f"{recipe.where(('stages', index))}: stages[{index}] ({stage.type}): {exc}") from None
