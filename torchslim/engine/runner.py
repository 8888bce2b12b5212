"""Runs a recipe: validate -> build -> baseline -> for each stage apply, measure, checkpoint -> report."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, names
from .checkpoints import ReloadProblem, reload_problem, resume, save_checkpoint
from .environment import environment
from .errors import StageError, TorchslimError, plain_text
from .headline import close_report, compiled_note
from .labels import labelled
from .metrics import fingerprint, measure, torch_threads
from .outputs import clear_failure, prepare_output, record_failure
from .prepare import baseline_failure, prepare
from .recipe import MetricsOptions, RecipeBase, load_recipe
from .reference import check_reference, reference_folder
from .registry import Registry, is_builtin
from .report import Report, Row
from .saving import save_model
from .stage import Context, Stage
from .study_fields import refuse_sweep
from .usercode import importable

RecipeSource = str | os.PathLike[str] | Mapping[str, Any] | RecipeBase


def run(
    recipe: RecipeSource,
    out: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    overwrite: bool = False,
    resume: bool = False,
    log: logging.Logger | None = None,
    baseline: Row | None = None,
) -> RunReport:
    """Run a recipe (a path, a mapping, or a validated recipe) and return its report; ``report.model``
    is the compressed model (in memory only: not written to the report files, not pickled).

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
        run_ = _Run(recipe, out_dir if main else None, log or logging.getLogger("torchslim"))
        # A module next to the recipe imports as its target. Everything outside timing (building, training,
        # evaluation) runs on the recipe's threads; timing sets metrics.threads itself.
        with importable(recipe.base_dir), torch_threads(recipe.work_threads()):
            return run_.execute(resume and out_dir is not None, baseline)


@dataclass
class RunReport(Report):
    """The report of :func:`run`, holding the compressed model it produced as ``model``."""

    model: nn.Module | None = field(default=None, repr=False, compare=False)
    """The model after the last stage, in eval mode; left out of the report files and of a pickled report
    (``torchslim compare``'s worker processes send their reports back without it)."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "model": None}


@dataclass
class _Run:
    """One run of a recipe; ``writer`` is the output directory (None: write nothing, or not rank 0)."""

    recipe: RecipeBase
    writer: Path | None
    log: logging.Logger

    def execute(self, resuming: bool, baseline: Row | None) -> RunReport:
        check_reference(self.recipe)  # before the stages, not after them
        ctx, model = prepare(self.recipe, self.log)
        report = RunReport(self.recipe.resolved(), metric=ctx.metric_name, environment=environment(self.recipe))
        done = resume(self.writer, self.recipe, ctx, report) if resuming and self.writer is not None else None
        model, records = done or (model, [])
        if done is None:
            report.rows.append(copy.deepcopy(baseline) if baseline else self._baseline(model, ctx))
        with self._failure_log():
            for index in range(len(records), len(self.recipe.stage_list)):
                with self._located(index):
                    model = self._step(index, model, ctx, report, records)
            if distributed.is_main():
                close_report(report, ctx, model, self.recipe.metrics, reference_folder(self.recipe))
        if self.writer is not None:
            save_model(self.writer, self.recipe, model, records)
            report.write(self.writer)
            clear_failure(self.writer)
        report.model = model.eval()
        return report

    def _baseline(self, model: nn.Module, ctx: Context) -> Row:
        try:
            return Row("baseline", None, self._measure(model, ctx, 0.0))
        except TorchslimError:
            raise
        except Exception as exc:  # before any stage ran, only the recipe's own code can have failed
            raise baseline_failure(self.recipe, exc) from exc

    def _step(self, index: int, model: nn.Module, ctx: Context, report: Report, records: list[dict[str, Any]]) -> nn.Module:
        """Apply, measure and checkpoint stage ``index``; return the model after it."""
        stage, total = labelled(self.recipe.stage_list)[index], len(self.recipe.stage_list)
        self.log.info("[%d/%d] %s: running", index + 1, total, stage.label)
        torch.manual_seed(self.recipe.seed + index + 1)
        reseed_loaders(ctx.data, self.recipe.seed + index + 1)
        own = ctx.for_stage()
        model, seconds = apply_stage(stage, model, own)
        for note in filter(None, [compiled_note(stage.label, model)]):
            own.note(note)
        with stage_failure(stage.label, "the model it returned fails in the measurement after the stage: "):
            report.rows.append(self._row(stage, model, own, seconds, report.final))
        report.add_notes(own.notes)
        records.append(dict(own.restore_record))
        if self.writer is not None:
            save_checkpoint(self.writer, index, self.recipe, model, records, report)
            self._check_reload(self.writer, index, stage, model, ctx)
        self.log.info("[%d/%d] %s: done in %.1fs", index + 1, total, stage.label, seconds)
        return model

    def _row(self, stage: Stage, model: nn.Module, own: Context, seconds: float, previous: Row) -> Row:
        if stage.changes_model:
            return Row(stage.label, stage.type, {**self._measure(model, own, seconds), **own.metrics})
        # Declared and checked unchanged: the figures above still hold; measuring again would only add noise.
        kept = (*names.MEASURED, own.metric_name)
        figures = {key: previous.metrics[key] for key in kept if key in previous.metrics}
        return Row(stage.label, stage.type, {**figures, names.SECONDS: seconds, **own.metrics}, unchanged=True)

    def _measure(self, model: nn.Module, ctx: Context, seconds: float) -> dict[str, Any]:
        # Other ranks of a torchrun launch only train: their rows carry the stage's time alone.
        if not distributed.is_main():
            return {names.SECONDS: seconds}
        return measured_figures(model, ctx, self.recipe.metrics, seconds)

    def _check_reload(self, writer: Path, index: int, stage: Stage, model: nn.Module, ctx: Context) -> None:
        problem = reload_problem(writer, index, self.recipe, model, ctx)
        if problem is not None:
            raise StageError(stage.label, reload_message(stage, problem)) from problem.cause

    @contextmanager
    def _located(self, index: int) -> Any:
        """Add stage ``index``'s position in the recipe to a StageError raised in the block."""
        try:
            yield
        except StageError as exc:
            stage = self.recipe.stage_list[index]
            exc.locate(index, stage.type, self.recipe.where(("stages", index)))
            raise

    @contextmanager
    def _failure_log(self) -> Any:
        try:
            yield
        except BaseException as exc:  # Ctrl-C included: the log says what happened, checkpoints stay
            if self.writer is not None:
                record_failure(self.writer, exc)
            raise


def measured_figures(model: nn.Module, ctx: Context, options: MetricsOptions, seconds: float) -> dict[str, Any]:
    """A row's measured figures: :func:`~.metrics.measure`'s, plus the score on the validation data when there is
    some (what compare chooses a variant by)."""
    return {**measure(model, ctx, options, seconds).to_dict(), **ctx.validation_figures(model)}


def baseline_row(model: nn.Module, ctx: Context, options: MetricsOptions) -> Row:
    """The row of the model before any stage: a run's first, and the one ``torchslim compare`` shares."""
    return Row("baseline", None, measured_figures(model, ctx, options, 0.0))


def reload_message(stage: Stage, problem: ReloadProblem) -> str:
    """The error of a stage whose checkpoint does not load back as the model it returned: what happened, in
    a user's words; then, for a plugin's stage, what its author must do (a built-in's failure is torchslim's)."""
    text = " ".join(plain_text(problem.text).split())  # torch's load_state_dict message spans lines
    if problem.unreadable:
        what = f"the model it returned cannot be saved so that it loads again ({text})"
        kept = "a model that torchslim.load_model cannot load"
        author = (
            "everything in the model's state dict must load with torch.load(weights_only=True): tensors "
            "and plain Python values, no other objects"
        )
    else:
        what = f"the model it returned cannot be rebuilt from its checkpoint as torchslim.load_model would ({text})"
        kept = "a model that would not load back as it was"
        author = (
            "a stage that changes the model's structure (swaps modules, removes channels) must record what it "
            "changed with ctx.record_for_restore(...) and redo it in restore(model, record)"
        )
    stopped = (
        f"{what}. The run stopped here rather than leave in --out {kept}; without --out nothing is saved "
        f"and this check does not run."
    )
    if is_builtin(type(stage)):
        return f"{stopped} This is a torchslim bug in the {stage.type} stage: please report it with the recipe."
    return f"{stopped} For the stage's author: {author}."


def reseed_loaders(data: Mapping[str, Any], seed: int) -> None:
    """Reset the shuffling generator of each DataLoader, so a stage sees the same batch order
    whether the stages before it ran in this process or were resumed from checkpoints."""
    for loader in data.values():
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)


@contextmanager
def stage_failure(label: str, doing: str = "") -> Any:
    """Any exception of the block (not a TorchslimError) becomes stage ``label``'s StageError."""
    try:
        yield
    except TorchslimError:
        raise
    except Exception as exc:  # the stage's model, measured: its failure is the stage's
        raise StageError(label, f"{doing}{type(exc).__name__}: {exc}") from exc


def apply_stage(stage: Stage, model: nn.Module, ctx: Context) -> tuple[nn.Module, float]:
    """Run one stage; StageError if it fails, returns something else than a module, or changes nothing
    without saying so with :meth:`Context.keep_input` (or, for a stage declaring ``changes_model = False``,
    changes something)."""
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
    unchanged = fingerprint(result) == before
    if unchanged and stage.changes_model and not ctx.kept_input:
        raise StageError(stage.label, "the stage changed nothing in the model (same modules, same weights)")
    if not unchanged and not stage.changes_model:
        raise StageError(
            stage.label,
            f"{type(stage).__name__} declares changes_model = False, but the model it returned differs (modules or weights)",
        )
    return result, seconds
