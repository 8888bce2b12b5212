"""Applies a recipe's stages in order, measuring the model before the first and after each."""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .. import __version__
from . import distributed
from .atomic import write_text
from .checkpoints import CHECKPOINT_DIR, Resumed, find_resumable, recipe_hash, save_checkpoint
from .compare_spec import refuse_sweep
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
from .packed import packed_size_bytes
from .recipe import RecipeBase, load_recipe
from .registry import Registry
from .report import Report, Row
from .saving import MODEL_FILE, RECIPE_FILE, save_model
from .specs import build_data, build_model, import_target
from .stage import Context, Stage

RecipeSource = str | os.PathLike[str] | Mapping[str, Any] | RecipeBase
FAILURE_LOG = "torchslim.log"
OUTPUT_FILES = ("report.json", "report.csv", "report.md", RECIPE_FILE, MODEL_FILE, CHECKPOINT_DIR, FAILURE_LOG)


def run(
    recipe: RecipeSource,
    out: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    overwrite: bool = False,
    resume: bool = False,
    log: logging.Logger | None = None,
    baseline: Row | None = None,
) -> Report:
    """Run a recipe (a path, a mapping, or a validated recipe) and return its report.

    With ``out``, also writes the reports, the resolved recipe and the final model there, and a
    checkpoint after every stage; ``resume`` reuses the checkpoints whose recipe prefix is unchanged.
    ``baseline`` is a row measured before on the same model, data, metrics and seed (``torchslim
    compare`` shares one between recipes): it is used instead of measuring the model again.
    """
    recipe = load_recipe(recipe, registry)
    refuse_sweep(recipe)
    # Under torchrun every process runs the recipe (a distill stage trains in parallel); only
    # rank 0 measures and writes. Outside torchrun this is a single main process.
    with distributed.session(distributed.device_for(recipe.device)):
        main = distributed.is_main()
        out_dir = Path(out) if out is not None else None
        if out_dir is not None:
            prepare_output(out_dir, overwrite or resume, create=main)
        distributed.barrier()
        return _execute(recipe, out_dir, resume, baseline, log or logging.getLogger("torchslim"), main)


def _execute(recipe: RecipeBase, out_dir: Path | None, resume: bool, baseline: Row | None,
             log: logging.Logger, main: bool) -> Report:
    ctx, model = prepare(recipe, log)
    report = Report(recipe.resolved(), metric=ctx.metric_name, notes=ctx.notes, environment=environment(recipe))
    resumed = find_resumable(out_dir, recipe, model) if resume and out_dir is not None else None
    if resume and resumed is None:
        ctx.log.info("resume: no checkpoint in %s matches this recipe; running every stage", out_dir)
    if resumed is not None:
        model, structure = _reuse(resumed, report, ctx, out_dir)
    else:
        first = copy.deepcopy(baseline) if baseline else Row("baseline", None, _measure_on_main(model, ctx, recipe, 0.0))
        report.rows.append(first)
        structure = []
    writer = out_dir if main else None
    try:
        for index in range(len(structure), len(recipe.stage_list)):
            model = _step(index, recipe, model, ctx, report, structure, writer)
    except BaseException as exc:  # Ctrl-C included: the log says what happened, checkpoints stay
        if writer is not None:
            _record_failure(writer, exc)
        raise
    if writer is not None:
        save_model(writer, recipe, model, structure)
        report.write(writer)
    return report


def _measure_on_main(model: nn.Module, ctx: Context, recipe: RecipeBase, seconds: float) -> dict[str, Any]:
    # Other ranks of a torchrun launch only train: their rows carry the stage's time alone.
    return measure(model, ctx, recipe, seconds) if distributed.is_main() else {"seconds": seconds}


def _step(index: int, recipe: RecipeBase, model: nn.Module, ctx: Context, report: Report,
          structure: list[dict[str, Any]], out_dir: Path | None) -> nn.Module:
    """Apply, measure and checkpoint stage ``index``; return the model after it."""
    stage, total = recipe.stage_list[index], len(recipe.stage_list)
    ctx.log.info("[%d/%d] %s: running", index + 1, total, stage.label)
    torch.manual_seed(recipe.seed + index + 1)
    reseed_loaders(ctx.data, recipe.seed + index + 1)
    model, seconds = apply_stage(stage, model, ctx)
    report.rows.append(Row(stage.label, stage.type, {**_measure_on_main(model, ctx, recipe, seconds), **ctx.metrics}))
    structure.append(dict(ctx.structure))
    if out_dir is not None:
        save_checkpoint(out_dir, index, recipe, model, structure, report)
    ctx.log.info("[%d/%d] %s: done in %.1fs", index + 1, total, stage.label, seconds)
    return model


def _reuse(resumed: Resumed, report: Report, ctx: Context, out_dir: Path | None) -> tuple[nn.Module, list[dict[str, Any]]]:
    labels = ", ".join(row.stage for row in resumed.rows[1:])
    ctx.log.info("resume: reusing %d completed stage(s) (%s) from %s", resumed.stages_done, labels,
                 out_dir / CHECKPOINT_DIR if out_dir else "")
    report.rows.extend(resumed.rows)
    ctx.notes.extend(n for n in resumed.notes if n not in ctx.notes)
    return resumed.model, resumed.structure


def reseed_loaders(data: Mapping[str, Any], seed: int) -> None:
    """Reset the shuffling generator of each DataLoader, so a stage sees the same batch order
    whether the stages before it ran in this process or were resumed from checkpoints."""
    for loader in data.values():
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)


def _record_failure(out_dir: Path, exc: BaseException) -> None:
    path = out_dir / FAILURE_LOG
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    write_text(path, text)
    if isinstance(exc, TorchslimError):
        exc.log_path = path


def prepare(recipe: RecipeBase, log: logging.Logger) -> tuple[Context, nn.Module]:
    """Build the model and data (seeded) and the context the stages will share."""
    device = _device(recipe)
    torch.manual_seed(recipe.seed)
    with located(recipe, ("model",)):
        model = build_model(recipe.model, recipe.base_dir).to(device)
    torch.manual_seed(recipe.seed)
    with located(recipe, ("data",)):
        data = build_data(recipe.data)
    with located(recipe, ("evaluate", "metric")):
        evaluator = import_target(recipe.evaluate.metric, "evaluate.metric") if recipe.evaluate.metric != "accuracy" else accuracy
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


def _device(recipe: RecipeBase) -> torch.device:
    device = distributed.device_for(recipe.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{recipe.where(('device',))}: device: '{recipe.device}' was asked for, but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use device: cpu")
    return device


def check_targets(recipe: RecipeBase) -> None:
    """Import every ``module:callable`` the recipe names (without calling it); RecipeError with position if one fails."""
    targets = [(("model", "target"), recipe.model.target), (("data", "target"), recipe.data.target)]
    if recipe.evaluate.metric != "accuracy":
        targets.append((("evaluate", "metric"), recipe.evaluate.metric))
    for path, target in targets:
        with located(recipe, path):
            import_target(target, ".".join(path))


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
    """Every figure of one summary row (only the task metric and time when ``metrics.collect`` is off)."""
    model.eval()
    opts = recipe.metrics
    if not opts.collect:
        return {ctx.metric_name: ctx.evaluate(model), "seconds": seconds}
    params, nonzero = count_params(model), count_nonzero(model)
    batch = latency_batch(ctx.example_inputs, opts.batch_size)
    latency = latency_ms(model, batch, warmup=opts.warmup, runs=opts.runs, threads=opts.threads) if opts.latency else None
    return {
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "size_bytes": size_bytes(model),
        "packed_bytes": packed_size_bytes(model),
        "macs": count_macs(model, ctx.example_inputs[:1]),
        "latency_ms": latency,
        ctx.metric_name: ctx.evaluate(model),
        "seconds": seconds,
    }


def prepare_output(out_dir: Path, reuse: bool, create: bool = True) -> Path:
    """Check ``out_dir`` can take the outputs without destroying anything the user had.

    A non-empty directory is used only with ``reuse`` (``--overwrite`` or ``--resume``), and then
    only torchslim's own files in it are replaced.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not reuse:
        raise OutputError(f"{out_dir}: directory is not empty; choose another --out, pass --resume to continue "
                          f"a run there, or --overwrite (which replaces only {', '.join(OUTPUT_FILES)})")
    if create:
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
        "device": recipe.device,
        "processes": distributed.world_size(),
        "recipe_hash": recipe_hash(recipe),
    }
