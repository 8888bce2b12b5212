"""Building what a run needs from its recipe: the model, the data, the metric, the shared context."""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from . import distributed
from .errors import RecipeError, UserCodeError
from .metrics import TargetMismatch, accuracy
from .recipe import RecipeBase
from .specs import build_data, build_model, import_target
from .stage import Context
from .usercode import importable


def prepare(recipe: RecipeBase, log: logging.Logger) -> tuple[Context, nn.Module]:
    """Build the model and data (seeded) and the context the stages will share, with the recipe's
    directory importable (``torchslim compare`` measures its shared baseline through here, outside run)."""
    with importable(recipe.base_dir):
        return _prepare(recipe, log)


def _prepare(recipe: RecipeBase, log: logging.Logger) -> tuple[Context, nn.Module]:
    device = _device(recipe)
    torch.manual_seed(recipe.seed)
    with located(recipe, ("model",)):
        model = build_model(recipe.model, recipe.base_dir).to(device)
    torch.manual_seed(recipe.seed)
    with located(recipe, ("data",)):
        data = build_data(recipe.data)
    evaluator = metric_function(recipe)
    data = _scored_fraction(data, recipe)
    inputs = first_inputs(data["eval"], recipe).to(device)
    _check_forward(model, inputs, recipe)
    ctx = Context(
        original=copy.deepcopy(model).eval(),
        data=data,
        example_inputs=inputs,
        evaluate=lambda m: _score(evaluator, m, data["eval"], recipe),
        validate=_scorer(evaluator, data.get("validation"), recipe),
        metric_name=recipe.evaluate.label,
        device=device,
        seed=recipe.seed,
        base_dir=recipe.base_dir,
        log=log,
        latency_batch=recipe.metrics.batch_size,
        threads=recipe.metrics.threads,
    )
    return ctx, model


def _scored_fraction(data: dict[str, Any], recipe: RecipeBase) -> dict[str, Any]:
    """The data with its eval and validation loaders cut to ``evaluate.fraction`` of their batches (at least one)."""
    fraction = recipe.evaluate.fraction
    if fraction >= 1:
        return data
    cut = dict(data)
    for part in ("eval", "validation"):
        loader = data.get(part)
        if loader is None:
            continue
        try:
            batches = len(loader)
        except TypeError:
            raise RecipeError(
                f"{recipe.where(('evaluate', 'fraction'))}: evaluate.fraction: the {part} loader has no "
                f"length, so a fraction of it cannot be chosen; give the data factory a sized loader"
            ) from None
        cut[part] = FirstBatches(loader, max(1, math.ceil(fraction * batches)))
    return cut


class FirstBatches:
    """The first ``count`` batches of a loader, as a loader (``len`` and iteration; other attributes its own)."""

    def __init__(self, loader: Any, count: int) -> None:
        self.loader, self.count = loader, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.count)

    def __getattr__(self, name: str) -> Any:  # dataset, batch_size: what a custom metric may read
        if name == "loader":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def metric_function(recipe: RecipeBase) -> Any:
    """The callable the recipe's ``evaluate.metric`` names (imported, not called)."""
    if recipe.evaluate.metric == "accuracy":
        return accuracy
    with located(recipe, ("evaluate", "metric")):
        return import_target(recipe.evaluate.metric, "evaluate.metric")


def _device(recipe: RecipeBase) -> torch.device:
    device = distributed.device_for(recipe.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            f"{recipe.where(('device',))}: device: '{recipe.device}' was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}); use device: cpu"
        )
    return device


class located:
    """Prefix RecipeErrors raised in the block with the recipe position of ``path`` (or of the
    finer path a UserCodeError names, e.g. the unknown key under ``model.kwargs``)."""

    def __init__(self, recipe: RecipeBase, path: tuple[str, ...]) -> None:
        self.recipe, self.where = recipe, recipe.where(path)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if isinstance(exc, RecipeError) and not exc.problems[0].startswith(self.where):
            path = getattr(exc, "path", ())
            where = self.recipe.where(path) if path else self.where
            problems = [f"{where}: {p}" for p in exc.problems]
            # A user's failure keeps its class and its cause: --debug shows the user's traceback.
            if isinstance(exc, UserCodeError):
                raise UserCodeError(problems, path) from exc.__cause__
            raise RecipeError(problems) from None
        return False


def first_inputs(loader: Any, recipe: RecipeBase) -> torch.Tensor:
    """The inputs of ``loader``'s first batch: the example inputs a run traces and times (errors located at data.target)."""
    with located(recipe, ("data", "target")):
        batch = _first_batch(loader, recipe.data.target)
    inputs = batch[0] if isinstance(batch, (tuple, list)) else None
    if isinstance(inputs, torch.Tensor):
        return inputs
    where = recipe.where(("data", "target"))
    raise RecipeError(
        f"{where}: data.target: the eval loader must yield (inputs, targets) tensor batches, found {type(batch).__name__}"
    )


def _first_batch(loader: Any, target: str) -> Any:
    try:
        return next(iter(loader))
    except StopIteration:
        raise UserCodeError(f"data.target: {target}(): the eval loader yields no batch") from None
    except Exception as exc:  # the user's dataset code
        raise UserCodeError(
            f"data.target: {target}(): the eval loader raised {type(exc).__name__} while yielding its first batch: {exc}"
        ) from exc


def _check_forward(model: nn.Module, inputs: torch.Tensor, recipe: RecipeBase) -> None:
    """One forward of the model on a batch of the data: inputs that do not fit it are named as such."""
    try:
        with torch.no_grad():
            model.eval()(inputs)
    except Exception as exc:  # the user's model on the user's data
        where = recipe.where(("model", "target"))
        raise UserCodeError(
            f"{where}: model.target: {recipe.model.target} fails on a batch of data.target "
            f"{recipe.data.target} (inputs of shape {list(inputs.shape)}, {inputs.dtype}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def baseline_failure(recipe: RecipeBase, exc: Exception) -> UserCodeError:
    """The error for a measurement of the model before any stage that raised: the recipe's code failed."""
    custom = recipe.evaluate.metric != "accuracy"
    if isinstance(exc, TargetMismatch):  # the data does not fit the built-in metric: say that, not "the model failed"
        path = ("evaluate", "metric")
        return UserCodeError(f"{recipe.where(path)}: evaluate.metric: accuracy on data.target {recipe.data.target}: {exc}", path)
    path = ("evaluate", "metric") if custom else ("model", "target")
    parts = f"model {recipe.model.target}, data {recipe.data.target}" + (f", metric {recipe.evaluate.metric}" if custom else "")
    return UserCodeError(
        f"{recipe.where(path)}: {'.'.join(path)}: measuring the model before any stage failed "
        f"({parts}): {type(exc).__name__}: {exc}",
        path,
    )


def _scorer(evaluator: Any, loader: Any, recipe: RecipeBase) -> Callable[[nn.Module], float] | None:
    """The metric on ``loader`` (the validation data), or None when the data factory gave none."""
    if loader is None:
        return None
    return lambda model: _score(evaluator, model, loader, recipe)


def _score(evaluator: Any, model: nn.Module, loader: Any, recipe: RecipeBase) -> float:
    model.eval()
    value = evaluator(model, loader)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        where = recipe.where(("evaluate", "metric"))
        raise UserCodeError(
            f"{where}: evaluate.metric: returned {type(value).__name__}, expected a float", ("evaluate", "metric")
        )
    return float(value)
