"""``torchslim export RUN_DIR --to onnx|openvino``: a finished float run exported beside its ``model.pt``.

The run's model is rebuilt as :func:`torchslim.load_model` rebuilds it (the saved ``recipe.yaml``,
each stage's ``restore``, the tensors of ``model.pt`` loaded with ``weights_only=True``). The example
inputs are the first batch of the eval loader that the saved recipe's ``data.target`` yields, built
again with the recipe's seed: the batch a ``deploy`` stage at the end of the recipe would have traced
and checked parity on (the run does not store its inputs). The export and the parity check are the
deploy stage's own (:func:`~.export.export`, :func:`~.export.check_parity`). The runtime's files and
``deploy.json`` are written atomically beside ``model.pt``, which is left as it is: ``load_model(RUN_DIR)``
still returns the torch model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from torch import nn

from .engine.checkpoints import PROGRESS_FILE, checkpoint_dir
from .engine.errors import CheckpointError, OutputError, UsageError, UserInputError
from .engine.labels import labelled
from .engine.prepare import first_inputs, located
from .engine.recipe import RecipeBase
from .engine.registry import Registry
from .engine.report import REPORT_JSON
from .engine.saving import (
    DEPLOY_FILES,
    DEPLOY_INFO,
    MODEL_FILE,
    RECIPE_FILE,
    opened_run,
    write_deploy_files,
)
from .engine.specs import build_data
from .engine.words import one_of
from .plugins.deploy import (
    ExportFailed,
    MissingExtra,
    RuntimeModel,
    check_parity,
    dynamic_dims,
    export,
    exporter_for,
    require_runtime,
    runtime_label,
)

if TYPE_CHECKING:
    from .plugins.deploy import DeployStage

#: ``--to`` -> the runtime that checks parity and whose files are written.
TARGETS = {"onnx": "onnxruntime", "openvino": "openvino"}
#: The quantize methods that run inside each runtime (what to put after a deploy stage instead).
RUNTIME_METHODS = {"onnxruntime": "ort_static or ort_dynamic", "openvino": "nncf"}


@dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote, and how close the runtime came to torch on the example inputs."""

    run_dir: Path
    files: tuple[str, ...]
    """The files written in ``run_dir``: ``model.onnx`` (or ``model.xml``, ``model.bin``), then ``deploy.json``."""
    runtime: str
    """The runtime and its version: ``onnxruntime 1.32.0``."""
    largest_difference: float
    allowed: float
    info: dict[str, Any] = field(default_factory=dict)
    """The content of ``deploy.json``."""
    removed: tuple[str, ...] = ()
    """An earlier export's files for the other runtime, removed (with ``overwrite``): deploy.json describes one runtime's."""

    def line(self) -> str:
        """One line for the terminal: the files, the runtime and the parity found, and what was removed."""
        removed = (
            f"; removed the earlier export's {one_of(self.removed, 'and')}, which deploy.json no longer describes"
            if self.removed
            else ""
        )
        return (
            f"wrote {one_of([str(self.run_dir / name) for name in self.files], 'and')} ({self.runtime}: outputs "
            f"match torch's on the example inputs within {self.allowed:.3g}, largest difference "
            f"{self.largest_difference:.3g}){removed}"
        )


def export_run(
    run_dir: str | os.PathLike[str],
    to: str,
    *,
    opset: int = 18,
    exporter: str = "auto",
    dynamic_axes: Iterable[int] = (0,),
    tolerance: float = 1e-4,
    overwrite: bool = False,
    example: torch.Tensor | None = None,
    registry: Registry | None = None,
) -> Exported:
    """Export the float model of a finished run (``torchslim run RECIPE --out RUN_DIR``) for a runtime.

    ``to="onnx"`` writes ``RUN_DIR/model.onnx`` (checked in ONNX Runtime); ``to="openvino"`` writes
    ``RUN_DIR/model.xml`` + ``model.bin``. ``RUN_DIR/deploy.json`` describes them as the ``deploy`` stage's
    does (runtime, version, files, inputs, outputs, opset, metric), with ``metric_value`` (the last row's
    metric in the run's report.json, measured in torch; progress.json for a checkpoint folder) and
    ``parity`` (largest difference, allowed difference). ``opset``, ``exporter``,
    ``dynamic_axes`` and ``tolerance`` mean what the deploy stage's options mean, and are checked as
    they are. ``example`` is the input batch to trace and check on; by default the first batch of the
    recipe's eval loader (the recipe's data factory is called again). Files of an earlier export are
    replaced only with ``overwrite`` (and a runtime's files not written this time are then removed:
    deploy.json describes every deployable file in the folder); ``model.pt`` is never changed.

    Raises UserInputError (exit code 2 on the command line): not a run directory, a model already
    deployed or quantized in torch (neither exports), a missing extra, an export that fails, or outputs
    that differ from torch's by more than ``tolerance`` x the largest output (at least 1).
    """
    folder = Path(run_dir)
    options = _options(to, opset=opset, exporter=exporter, dynamic_axes=list(dynamic_axes), tolerance=tolerance)
    _check_run_dir(folder)
    with opened_run(folder, registry) as run:  # the recipe's own modules import as they did in the run
        recipe, model = run.recipe, run.model
        _refuse_unexportable(folder, model, recipe.stage_list[: len(run.payload["structure"])], options.runtime)
        try:
            require_runtime(options.runtime)
        except MissingExtra as exc:
            raise UserInputError(f"export to {to}: {exc}") from None
        _check_outputs(folder, overwrite)
        inputs = (first_eval_batch(recipe) if example is None else example).cpu()
    source = model.cpu()
    try:
        dims = dynamic_dims(options.dynamic_axes, inputs)
        logging.getLogger("torchslim").info(
            "export: %s to %s (%s exporter), traced on inputs of shape %s",
            folder / MODEL_FILE,
            to,
            exporter_for(options.runtime, options.exporter),
            list(inputs.shape),
        )
        deployed = export(source, inputs, options.runtime, options.opset, options.exporter, dims)
        diff, allowed = check_parity(source, deployed, inputs, options.tolerance)
    except ExportFailed as exc:
        hint = f"; try the {exc.other_exporter} exporter" if exc.other_exporter else ""
        raise UserInputError(f"{folder}: {exc}{hint}") from exc.__cause__
    info = {
        **deployed.deploy_info(),
        "metric": recipe.evaluate.metric,
        **_measured(folder, recipe.evaluate.label),
        "parity": {"largest_difference": diff, "allowed": allowed},
    }
    # The other runtime's files of an earlier export go too, so deploy.json describes every deployable file.
    before = {name for name in DEPLOY_FILES if (folder / name).exists()}
    written = write_deploy_files(folder, deployed, info)
    removed = tuple(name for name in DEPLOY_FILES if name in before and name not in written)
    return Exported(folder, written, runtime_label(deployed), diff, allowed, info, removed)


def first_eval_batch(recipe: RecipeBase) -> torch.Tensor:
    """The inputs of the first batch of ``recipe``'s eval loader, the data built with the recipe's seed
    as a run builds it (the run's example inputs); the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        with located(recipe, ("data",)):
            data = build_data(recipe.data)
        return first_inputs(data["eval"], recipe)


def _options(to: str, **options: Any) -> DeployStage:
    """The export options, validated as the deploy stage's (same names, defaults and limits)."""
    from .plugins.deploy import DeployStage

    if to not in TARGETS:
        raise UsageError(f"to: '{to}' is not a target; choose {' or '.join(TARGETS)}")
    try:
        return DeployStage(runtime=TARGETS[to], **options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors())
        raise UsageError(f"export options: {problems}") from None


def _check_run_dir(folder: Path) -> None:
    how = "torchslim export takes a folder written by torchslim run RECIPE --out DIR"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such directory; {how}")
    missing = [name for name in (MODEL_FILE, RECIPE_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: not a torchslim run directory (no {' and no '.join(missing)}); {how}")


def _refuse_unexportable(folder: Path, model: nn.Module, stages: list[Any], runtime: str) -> None:
    """UserInputError for a model already deployed, or quantized in torch (int8 modules, packed low-bit layers)."""
    if isinstance(model, RuntimeModel):
        raise UserInputError(
            f"{folder}: the run's model is already deployed to {model.runtime} (the run wrote its files "
            f"and deploy.json); torchslim export takes a run whose model is a float torch model"
        )
    quantized = [(index, stage) for index, stage in enumerate(labelled(stages)) if stage.type == "quantize"]
    layers = [f"layer '{name}' ({type(module).__name__})" for name, module in model.named_modules() if _quantized_layer(module)]
    if quantized:
        index, stage = quantized[0]
        by = f"stage {stage.label} (quantize, method {getattr(stage, 'method', '?')})"
    elif layers:
        index, by = 0, layers[0]
    else:
        return
    before = checkpoint_dir(folder, index - 1)
    earlier = f"; or export the checkpoint taken before it, {before}" if index > 0 and (before / MODEL_FILE).is_file() else ""
    raise UserInputError(
        f"{folder}: the run's model is quantized in torch ({by}): torch's quantized modules and torchslim's "
        f"packed low-bit layers do not export to ONNX; put {{type: deploy, runtime: {runtime}}} in the recipe "
        f"before the quantize stage, quantize after it with method {RUNTIME_METHODS[runtime]}, and run it "
        f"again{earlier}"
    )


def _quantized_layer(module: nn.Module) -> bool:
    from .plugins.quantize import is_quantized_layer

    return is_quantized_layer(module)


def _check_outputs(folder: Path, overwrite: bool) -> None:
    """OutputError if an earlier export's files are there and ``overwrite`` was not given."""
    existing = [name for name in (*DEPLOY_FILES, DEPLOY_INFO) if (folder / name).exists()]
    if existing and not overwrite:
        raise OutputError(
            f"{folder}: {', '.join(existing)} already there (from an earlier export); pass overwrite=True "
            f"to replace them (export writes only {', '.join(DEPLOY_FILES)}, {DEPLOY_INFO}; the other runtime's "
            f"files go too, since {DEPLOY_INFO} describes one runtime's)"
        )


def _measured(folder: Path, metric: str) -> dict[str, Any]:
    """``{"metric_value": ...}``: the last row's ``metric`` (measured in torch by the run) in the run's report.json,
    or in progress.json for a checkpoint folder; empty when neither has it."""
    for name in (REPORT_JSON, PROGRESS_FILE):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8"))["rows"][-1]["metrics"][metric]
        except (OSError, ValueError, LookupError, TypeError):  # absent, or not a file torchslim wrote
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"metric_value": value}
    return {}
