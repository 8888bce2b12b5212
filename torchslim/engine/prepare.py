"""Building what a run needs from its recipe: the model, the data, the metric, the shared context."""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch
from torch import nn

from . import distributed
from .errors import RecipeError
from .metrics import accuracy
from .recipe import RecipeBase
from .specs import build_data, build_model, import_target
from .stage import Context


def prepare(recipe: RecipeBase, log: logging.Logger) -> tuple[Context, nn.Module]:
    """Build the model and data (seeded) and the context the stages will share."""
    device = _device(recipe)
    torch.manual_seed(recipe.seed)
    with located(recipe, ("model",)):
        model = build_model(recipe.model, recipe.base_dir).to(device)
    torch.manual_seed(recipe.seed)
    with located(recipe, ("data",)):
        data = build_data(recipe.data)
    evaluator = metric_function(recipe)
    inputs = _first_inputs(data["eval"], recipe).to(device)
    ctx = Context(
        original=copy.deepcopy(model).eval(),
        data=data,
        example_inputs=inputs,
        evaluate=lambda m: _score(evaluator, m, data["eval"], recipe),
        metric_name=recipe.evaluate.label,
        device=device,
        seed=recipe.seed,
        base_dir=recipe.base_dir,
        log=log,
    )
    return ctx, model


def metric_function(recipe: RecipeBase) -> Any:
    """The callable the recipe's ``evaluate.metric`` names (imported, not called)."""
    if recipe.evaluate.metric == "accuracy":
        return accuracy
    with located(recipe, ("evaluate", "metric")):
        return import_target(recipe.evaluate.metric, "evaluate.metric")


def _device(recipe: RecipeBase) -> torch.device:
    device = distributed.device_for(recipe.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{recipe.where(('device',))}: device: '{recipe.device}' was asked for, but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use device: cpu")
    return device


class located:
    """Prefix RecipeErrors raised in the block with the recipe position of ``path``."""

    def __init__(self, recipe: RecipeBase, path: tuple[str, ...]) -> None:
        self.where = recipe.where(path)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if isinstance(exc, RecipeError) and not exc.problems[0].startswith(self.where):
            raise RecipeError([f"{self.where}: {p}" for p in exc.problems]) from None
        return False


def _first_inputs(loader: Any, recipe: RecipeBase) -> torch.Tensor:
    for batch in loader:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else None
        if isinstance(inputs, torch.Tensor):
            return inputs
        break
    where = recipe.where(("data", "target"))
    raise RecipeError(f"{where}: data.target: the eval loader must yield (inputs, targets) tensor batches")


def _score(evaluator: Any, model: nn.Module, loader: Any, recipe: RecipeBase) -> float:
    model.eval()
    value = evaluator(model, loader)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        where = recipe.where(("evaluate", "metric"))
        raise RecipeError(f"{where}: evaluate.metric: returned {type(value).__name__}, expected a float")
    return float(value)
