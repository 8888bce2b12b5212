"""The recipe of a trial's cheap run (``search.cheap``): its stages' epochs scaled down, its metric scored on a part
of the eval data; and the check, before any trial, that each rung is cheaper than the full run."""

from __future__ import annotations

import copy
import math
from typing import Any

from ..compare.sweep import set_path
from ..engine.errors import RecipeError
from ..engine.recipe import RecipeBase
from ..engine.study_fields import CheapRung
from ..engine.yamlio import Document


def rung_document(recipe: RecipeBase, rung: CheapRung, index: int) -> Document:
    """The recipe of cheap rung ``index`` of a trial: ``recipe`` (the trial's, validated) with every stage's epochs
    scaled by the rung (rounded up) and its metric scored on the rung's fraction of the eval data."""
    document = recipe.document
    assert document is not None  # a trial's recipe is validated from its document
    data: dict[str, Any] = copy.deepcopy(document.data)
    for i, stage in enumerate(recipe.stages):
        for name, epochs in _epochs(stage):
            scaled = max(1, math.ceil(epochs * rung.epochs_scale))
            set_path(data, f"stages.{i}.{name}", scaled, recipe.where(("search", "cheap")))
    if rung.eval_fraction < 1:
        set_path(data, "evaluate.fraction", rung.eval_fraction, recipe.where(("search", "cheap")))
    data["name"] = f"{recipe.name}-rung{index}"
    return Document(data, document.source, document.positions)


def check_rungs(recipe: RecipeBase) -> None:
    """A rung that only scales epochs, of a recipe in which no stage trains (and the space sets no epochs), is the
    full run again: RecipeError at its ``epochs_scale``."""
    spec = recipe.search
    if spec is None or spec.cheap is None:
        return
    searched = any(path.split(".")[-1] == "epochs" or path.endswith("_epochs") for path in spec.space)
    if searched or any(_epochs(stage) for stage in recipe.stages):
        return
    for i, rung in enumerate(spec.cheap.rungs):
        if rung.eval_fraction == 1:
            where = recipe.where(("search", "cheap", "rungs", i, "epochs_scale"))
            raise RecipeError(
                f"{where}: search.cheap.rungs[{i}].epochs_scale: no stage of the recipe trains (no epochs "
                f"option is set), so this rung is the full run; give it an eval_fraction below 1"
            )


def _epochs(stage: Any) -> list[tuple[str, int]]:
    """A stage's training lengths: its whole-number options named ``epochs`` or ``*_epochs`` that are set."""
    found = ((name, getattr(stage, name)) for name in type(stage).model_fields if name == "epochs" or name.endswith("_epochs"))
    return [(name, value) for name, value in found if isinstance(value, int) and not isinstance(value, bool)]
