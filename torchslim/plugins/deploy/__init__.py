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

import torch
from pydantic import Field
from torch import nn

from ...engine.errors import StageError
from ...engine.macs import count_macs
from ...engine.stage import Context, Stage
from .export import axis_name, graph_info, largest_difference, to_onnx
from .extras import MissingExtra, require, version
from .runtime import RuntimeModel

__all__ = ["DeployStage", "RuntimeModel", "from_record", "runtime_label", "wrap"]


class DeployStage(Stage):
    """Export the model to ONNX (dynamic batch axis, more with ``dynamic_axes``) and run it in a runtime from here on.

    The runtime's outputs on the example inputs must match torch's within ``tolerance`` (relative
    to the largest output), or the stage fails. Later rows are measured in the runtime: latency at
    the recipe's thread count, size as the bytes of the deployable files. Only float models export:
    put ``prune`` and ``distill`` stages before this one, and quantize after it with a runtime method.
    """

    type: Literal["deploy"] = "deploy"
    """The stage type: ``deploy``."""
    runtime: Literal["onnxruntime", "openvino"]
    """Where the model runs from here on: ``onnxruntime`` (extra ``[onnx]``) or ``openvino`` (extra ``[openvino]``)."""
    opset: int = Field(default=18, ge=17)
    """ONNX opset of the export (the dynamo exporter implements 18 and up)."""
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    """``dynamo`` (torch.export, the default exporter) or ``torchscript`` (the older tracer, for models dynamo cannot export)."""
    dynamic_axes: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Input dimensions left dynamic in the export: 0 is the batch; add 1 for a text model's sequence axis."""
    tolerance: float = Field(default=1e-4, gt=0)
    """Largest allowed difference between the runtime's and torch's outputs, relative to the largest output (at least 1)."""

    def check_environment(self) -> None:
        """Import the runtime and the exporter's packages now (``torchslim validate`` asks)."""
        try:
            require("export")
            require(self.runtime)
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
            onnx_bytes = to_onnx(source, example, self.opset, self.exporter, self._dims(example))
        except Exception as exc:  # the exporter fails in many ways; say which exporter and what to try
            raise StageError(self.label, f"export to ONNX ({self.exporter} exporter, opset {self.opset}) failed: "
                             f"{type(exc).__name__}: {_first_line(exc)}{_other_exporter(self.exporter)}") from exc
        info = {**graph_info(onnx_bytes), "macs": count_macs(source, example[:1]), "version": version(self.runtime),
                "exporter": self.exporter}
        deployed = wrap(self.runtime, onnx_bytes, info)
        self._check_parity(source, deployed, example, ctx)
        ctx.add_metric("runtime", runtime_label(deployed))
        ctx.record_for_restore(**deployed.restore_record())
        return deployed

    def _dims(self, example: torch.Tensor) -> tuple[int, ...]:
        wrong = [d for d in self.dynamic_axes if not 0 <= d < example.dim()]
        if wrong:
            raise StageError(self.label, f"dynamic_axes: {wrong} not a dimension of the input (shape {tuple(example.shape)})")
        return tuple(sorted(set(self.dynamic_axes)))

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """An empty :class:`RuntimeModel` of the saved files' sizes; the saved tensors fill it."""
        return from_record(record)

    def _check_parity(self, source: nn.Module, deployed: RuntimeModel, example: torch.Tensor, ctx: Context) -> None:
        with torch.inference_mode():
            expected, got = source(example), deployed(example)
        if [tuple(t.shape) for t in _outputs(expected)] != [tuple(t.shape) for t in _outputs(got)]:
            raise StageError(self.label, f"{self.runtime} returns outputs of shapes {_shapes(got)}, torch {_shapes(expected)}")
        diff, scale = largest_difference(expected, got)
        allowed = self.tolerance * max(1.0, scale)
        if not diff <= allowed:
            raise StageError(self.label, f"{self.runtime}'s outputs differ from torch's by up to {diff:.3g} on the example "
                             f"inputs (allowed: {allowed:.3g}, tolerance {self.tolerance} x the largest output {scale:.3g})")
        axes = ", ".join(axis_name(d) for d in sorted(set(self.dynamic_axes)))
        ctx.note(f"{self.label}: exported to ONNX (opset {deployed.info['opset']}, {self.exporter} exporter, dynamic axes "
                 f"{axes}) and run in {runtime_label(deployed)}; outputs match torch's on the example inputs within "
                 f"{allowed:.3g} (largest difference {diff:.3g}); this row and later ones are measured in {self.runtime} "
                 f"(latency at the recipe's thread count, size = the deployable files' bytes)")


def wrap(runtime: str, onnx_bytes: bytes, info: Mapping[str, Any]) -> RuntimeModel:
    """The ONNX model in a :class:`RuntimeModel` of ``runtime`` (converted to OpenVINO's IR for ``openvino``)."""
    if runtime == "openvino":
        from ._ov import from_onnx

        return from_onnx(onnx_bytes, dict(info))
    from ._ort import OnnxRuntimeModel

    return OnnxRuntimeModel({"onnx": onnx_bytes}, info)


def from_record(record: Mapping[str, Any]) -> RuntimeModel:
    """An empty :class:`RuntimeModel` shaped as ``record`` says (from :meth:`RuntimeModel.restore_record`)."""
    if record.get("runtime") == "openvino":
        from ._ov import OpenVinoModel as cls
    else:
        from ._ort import OnnxRuntimeModel as cls  # type: ignore[assignment]
    return cls({name: int(size) for name, size in record["sizes"].items()}, record.get("info", {}))


def runtime_label(model: RuntimeModel) -> str:
    """``onnxruntime 1.32.0``: the runtime a row was measured in, and its version."""
    return f"{model.runtime} {model.info.get('version', '')}".strip()


def _outputs(output: Any) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else [t for o in output for t in _outputs(o)]


def _shapes(output: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _outputs(output)]


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _other_exporter(exporter: str) -> str:
    return "; try exporter: torchscript" if exporter == "dynamo" else "; try exporter: dynamo"

