"""Built-in ``deploy`` stage: export the float model to ONNX and run it in ONNX Runtime or OpenVINO.

``{type: deploy, runtime: onnxruntime}`` (or ``openvino``) exports the current model, checks the
runtime's outputs against torch's, and returns a :class:`RuntimeModel`: the engine's evaluation,
latency and size measurements of this row and every later one run through the runtime. A
``quantize`` stage after it quantizes in the runtime's own format (methods ``ort_static``,
``ort_dynamic``, ``nncf``). The runtimes are optional: ``pip install 'torchslim[onnx]'`` or
``'torchslim[openvino]'``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context, Stage
from ._ov import OpenVinoModel, ir_files, kept_signal_stack
from .export import ExportFailed, axis_name, check_parity, dynamic_dims, export, exporter_for, wrap
from .extras import MissingExtra, quiet, require, require_runtime, version
from .runtime import STATIC_SHAPES, RuntimeModel, runtime_label, runtime_text

# The one interface to the runtimes for the rest of torchslim (quantize's runtime methods, torchslim export,
# the benches): nothing outside this package imports its modules.
__all__ = [
    "DeployStage",
    "ExportFailed",
    "MissingExtra",
    "OpenVinoModel",
    "RuntimeModel",
    "check_parity",
    "dynamic_dims",
    "export",
    "exporter_for",
    "from_record",
    "ir_files",
    "kept_signal_stack",
    "quiet",
    "require",
    "require_runtime",
    "runtime_label",
    "runtime_text",
    "version",
    "wrap",
]

#: Names that moved to :mod:`torchslim.export` (``torchslim export`` is a command, not part of a stage);
#: importing them from here still works, with a DeprecationWarning, for one release.
_MOVED = ("Exported", "export_run")


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    from ... import export

    warnings.warn(
        f"torchslim.plugins.deploy.{name} moved to torchslim.export.{name} (also torchslim.{name}); "
        "the old name goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(export, name)


class DeployStage(Stage):
    """Export the model to ONNX (dynamic batch axis, more with ``dynamic_axes``) and run it in a runtime from here on.

    The runtime's outputs on the example inputs must match torch's within ``tolerance`` (relative
    to the largest output), both in the session compiled for their shape and in the one of the dynamic
    axes, or the stage fails. Later rows are measured in the runtime: latency at
    the recipe's thread count, size as the bytes of the deployable files. Only float models export:
    put ``prune`` and ``distill`` stages before this one, and quantize after it with a runtime method.
    """

    type: Literal["deploy"] = "deploy"
    """The stage type: ``deploy``."""
    runtime: Literal["onnxruntime", "openvino"]
    """Where the model runs from here on: ``onnxruntime`` (extra ``[onnx]``) or ``openvino`` (extra ``[openvino]``)."""
    opset: int = Field(default=18, ge=17)
    """ONNX opset of the export (the dynamo exporter implements 18 and up)."""
    exporter: Literal["auto", "dynamo", "torchscript", "openvino"] = "auto"
    """``dynamo`` (torch.export to ONNX), ``torchscript`` (the older ONNX tracer, for models dynamo cannot export)
    or ``openvino`` (OpenVINO's own converter, ``ov.convert_model``, straight to its IR; runtime openvino only).
    ``auto``: openvino for runtime openvino (it fuses attention into one op: faster and closer to torch
    after int8 than through ONNX, docs/deploy.md), dynamo for onnxruntime."""
    dynamic_axes: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Input dimensions left dynamic in the export: 0 is the batch; add 1 for a text model's sequence axis."""
    static_shapes: int = Field(default=STATIC_SHAPES, ge=0)
    """How many distinct input shapes get a runtime session compiled for that shape alone (the first ones seen;
    one such session per thread count); later shapes run the session of the dynamic axes. A runtime plans
    memory and picks kernels better for a fixed shape (docs/deploy.md, "Sessions per shape", has the
    measurements), at the cost of a compile per shape and a copy of the weights in memory each. ``0``: one
    session of the dynamic axes for every shape, as the runtimes do by default."""
    tolerance: float = Field(default=1e-4, gt=0)
    """Largest allowed difference between the runtime's and torch's outputs, relative to the largest output (at least 1)."""

    def installed_runtime(self) -> str | None:
        """The runtime and its installed version as rows name it (``openvino 2026.4.1``); None if it does not import."""
        try:
            return runtime_text(self.runtime, version(self.runtime))
        except ImportError:
            return None

    def check_environment(self) -> None:
        """Import the runtime and the exporter's packages now (``torchslim validate`` asks)."""
        try:
            require_runtime(self.runtime)
        except MissingExtra as exc:
            raise StageError(self.label, f"runtime {self.runtime}: {exc}") from None

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """The model exported and wrapped in the runtime, after the parity check."""
        if isinstance(model, RuntimeModel):
            raise StageError(self.label, f"the model is already deployed to {model.runtime}; deploy once, after the float stages")
        self.check_environment()
        source = copy.deepcopy(model).cpu().eval()
        example = ctx.example_inputs.cpu()
        try:
            deployed = export(source, example, self.runtime, self.opset, self.exporter, dynamic_dims(self.dynamic_axes, example))
            deployed.info["static_shapes"] = self.static_shapes
            diff, allowed = check_parity(source, deployed, example, self.tolerance)
        except ExportFailed as exc:
            hint = f"; try exporter: {exc.other_exporter}" if exc.other_exporter else ""
            raise StageError(self.label, f"{exc}{hint}") from exc.__cause__
        axes = ", ".join(axis_name(d) for d in sorted(set(self.dynamic_axes)))
        exporter = deployed.info["exporter"]
        how = (
            "converted by OpenVINO's converter"
            if exporter == "openvino"
            else f"exported to ONNX (opset {deployed.info['opset']}, {exporter} exporter"
        )
        ctx.note(
            f"{self.label}: {how}{', ' if exporter != 'openvino' else ' ('}dynamic axes {axes}"
            f"{_static_note(self.static_shapes)}) and run in {runtime_label(deployed)}; outputs match torch's on the "
            f"example inputs (in each session) within {allowed:.3g} (largest difference {diff:.3g}); this row and "
            f"later ones are measured in {self.runtime} (latency at the recipe's thread count, size = the "
            "deployable files' bytes)"
        )
        ctx.add_metric("runtime", runtime_label(deployed))
        ctx.record_for_restore(**deployed.restore_record())
        return deployed

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """An empty :class:`RuntimeModel` of the saved files' sizes; the saved tensors fill it."""
        return from_record(record)


def _static_note(shapes: int) -> str:
    """How the deploy note says what ``static_shapes`` does."""
    if shapes == 0:
        return ", one session for every shape"
    return f"; the first {shapes} input shape(s) seen get a session compiled for that shape alone"


def from_record(record: Mapping[str, Any]) -> RuntimeModel:
    """An empty :class:`RuntimeModel` shaped as ``record`` says (from :meth:`RuntimeModel.restore_record`)."""
    if record.get("runtime") == "openvino":
        from ._ov import OpenVinoModel as cls
    else:
        from ._ort import OnnxRuntimeModel as cls  # type: ignore[assignment]
    return cls({name: int(size) for name, size in record["sizes"].items()}, record.get("info", {}))
