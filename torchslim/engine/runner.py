"""Applies a recipe's stages in order, measuring the model before the first and after each."""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .. import __version__
from .errors import OutputError, RecipeError, StageError, TorchslimError
from .metrics import (
    accuracy,
    count_macs,
    count_nonzero,
    count_params,
    fingerprint,
    latency_batch,
    latency_ms,
    size_bytes,
)
from .recipe import RecipeBase, load_recipe
from .registry import Registry
from .report import Report, Row
from .saving import MODEL_FILE, RECIPE_FILE, save_model
from .specs import build_data, build_model, import_target
from .stage import Context, Stage

RecipeSource = str | os.PathLike[str] | Mapping[str, Any] | RecipeBase
OUTPUT_FILES = ("report.json", "report.csv", "report.md", RECIPE_FILE, MODEL_FILE)


def run(
    recipe: RecipeSource,
    out: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    overwrite: bool = False,
    log: logging.Logger | None = None,
) -> Report:
    """Run a recipe (a path, a mapping, or a validated recipe) and return its report.

    With ``out``, also writes the reports, the resolved recipe and the final model there.
    """
    recipe = load_recipe(recipe, registry)
    out_dir = prepare_output(Path(out), overwrite) if out is not None else None
    ctx, model = prepare(recipe, log or logging.getLogger("torchslim"))
    report = Report(recipe.resolved(), metric=ctx.metric_name, environment=environment(recipe))
    report.rows.append(Row("baseline", None, measure(model, ctx, recipe, seconds=0.0)))
    stages = recipe.stage_list
    structure: list[dict[str, Any]] = []
    for index, stage in enumerate(stages):
        ctx.log.info("[%d/%d] %s: running", index + 1, len(stages), stage.label)
        torch.manual_seed(recipe.seed + index + 1)
        model, seconds = apply_stage(stage, model, ctx)
        row = Row(stage.label, stage.type, {**measure(model, ctx, recipe, seconds), **ctx.metrics})
        report.rows.append(row)
        structure.append(dict(ctx.structure))
        ctx.log.info("[%d/%d] %s: done in %.1fs", index + 1, len(stages), stage.label, seconds)
    report.notes.extend(ctx.notes)
    if out_dir is not None:
        save_model(out_dir, recipe, model, structure)
        report.write(out_dir)
    return report


def prepare(recipe: RecipeBase, log: logging.Logger) -> tuple[Context, nn.Module]:
    """Build the model and data (seeded) and the context the stages will share."""
    torch.manual_seed(recipe.seed)
    with located(recipe, ("model",)):
        model = build_model(recipe.model, recipe.base_dir)
    torch.manual_seed(recipe.seed)
    with located(recipe, ("data",)):
        data = build_data(recipe.data)
    with located(recipe, ("evaluate", "metric")):
        evaluator = import_target(recipe.evaluate.metric, "evaluate.metric") if recipe.evaluate.metric != "accuracy" else accuracy
    inputs = _first_inputs(data["eval"], recipe)
    ctx = Context(
        original=copy.deepcopy(model).eval(),
        data=data,
        example_inputs=inputs,
        evaluate=lambda m: _score(evaluator, m, data["eval"], recipe),
        metric_name=recipe.evaluate.label,
        seed=recipe.seed,
        base_dir=recipe.base_dir,
        log=log,
    )
    return ctx, model


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


def apply_stage(stage: Stage, model: nn.Module, ctx: Context) -> tuple[nn.Module, float]:
    """Run one stage; StageError if it fails, returns something else than a module, or changes nothing."""
    ctx.metrics, ctx.structure = {}, {}
    before = fingerprint(model)
    start = time.perf_counter()
    try:
        result = stage.apply(model, ctx)
    except TorchslimError:
        raise
    except Exception as exc:  # any failure inside a stage is reported as that stage's failure
        raise StageError(stage.label, f"{type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - start
    if not isinstance(result, nn.Module):
        raise StageError(stage.label, f"apply() returned {type(result).__name__}, expected an nn.Module")
    if fingerprint(result) == before:
        raise StageError(stage.label, "the stage changed nothing in the model (same modules, same weights)")
    return result, seconds


def measure(model: nn.Module, ctx: Context, recipe: RecipeBase, seconds: float) -> dict[str, Any]:
    """Every figure of one summary row."""
    model.eval()
    params, nonzero = count_params(model), count_nonzero(model)
    opts = recipe.metrics
    batch = latency_batch(ctx.example_inputs, opts.batch_size)
    latency = latency_ms(model, batch, warmup=opts.warmup, runs=opts.runs, threads=opts.threads) if opts.latency else None
    return {
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "size_bytes": size_bytes(model),
        "macs": count_macs(model, ctx.example_inputs[:1]),
        "latency_ms": latency,
        ctx.metric_name: ctx.evaluate(model),
        "seconds": seconds,
    }


def prepare_output(out_dir: Path, overwrite: bool) -> Path:
    """Check ``out_dir`` can take the outputs without destroying anything the user had."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir}: directory is not empty; choose another --out or pass --overwrite "
                          f"(which replaces only {', '.join(OUTPUT_FILES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def environment(recipe: RecipeBase) -> dict[str, Any]:
    """Versions and machine facts recorded in the report, so figures can be compared honestly."""
    return {
        "torchslim": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": recipe.metrics.threads or torch.get_num_threads(),
        "device": "cpu",
    }
