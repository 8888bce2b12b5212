"""Export a float torch model to ONNX (dynamic batch axis), wrap it in a runtime, and check the runtime against torch."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...engine.errors import first_line
from ...engine.macs import count_macs
from .extras import quiet, require, version
from .runtime import RuntimeModel


def axis_name(dim: int) -> str:
    """The name of a dynamic input axis: ``batch`` (0), ``sequence`` (1), ``dim2``..."""
    return {0: "batch", 1: "sequence"}.get(dim, f"dim{dim}")


def to_onnx(model: nn.Module, example: torch.Tensor, opset: int, exporter: str, dims: tuple[int, ...] = (0,)) -> bytes:
    """The ONNX bytes of ``model`` traced on ``example``, the input's axes ``dims`` left dynamic."""
    require("export")
    with _quiet():
        if exporter == "dynamo":
            return _dynamo(model, example, opset, dims)
        return _torchscript(model, example, opset, dims)


def _dynamo(model: nn.Module, example: torch.Tensor, opset: int, dims: tuple[int, ...]) -> bytes:
    shapes = {dim: torch.export.Dim(axis_name(dim)) for dim in dims}
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=(shapes,),
        input_names=["input"],
        output_names=["output"],
        verbose=False,
    )
    if program is None:  # only when asked to write a file instead
        raise RuntimeError("the dynamo exporter returned no program")
    proto = program.model_proto
    for node in proto.graph.node:
        # Source locations and stack traces of each node: a third of a small model's file, unused by runtimes.
        del node.metadata_props[:]
        node.doc_string = ""
    return bytes(proto.SerializeToString())


def _torchscript(model: nn.Module, example: torch.Tensor, opset: int, dims: tuple[int, ...]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        axes = {"input": {d: axis_name(d) for d in dims}, "output": {0: "batch"}}
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=axes,
        )
        return path.read_bytes()


def _quiet() -> contextlib.AbstractContextManager[None]:
    """Silence the exporter's progress lines and warnings (torchvision ops skipped, opset conversion):
    they say nothing about this model, and a failure raises anyway."""
    return quiet(["torch.onnx", "torch.export", "onnxscript"], silence_warnings=True)


def graph_info(onnx_bytes: bytes) -> dict[str, Any]:
    """Input and output names and shapes (a dynamic axis by its name) and the opset of an ONNX model."""
    onnx = require("onnx")
    model = onnx.load_from_string(onnx_bytes)

    def shapes(values: Any) -> dict[str, list[Any]]:
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return {"inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output), "opset": opset}


def largest_difference(expected: Any, got: Any) -> tuple[float, float]:
    """(largest absolute difference, largest magnitude of the expected outputs), over every output."""
    pairs = list(zip(_flat(expected), _flat(got), strict=True))
    if not pairs:
        return 0.0, 0.0
    diff = max(float((e.float() - g.float()).abs().max()) for e, g in pairs if e.numel())
    scale = max(float(e.float().abs().max()) for e, _ in pairs if e.numel())
    return diff, scale


def _flat(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output.detach().cpu()]
    return [t for value in output for t in _flat(value)]


class ExportFailed(Exception):
    """An export or a parity check that failed: the message says what, the caller says where (a stage,
    a run directory). ``other_exporter`` is the exporter to suggest when the exporter itself failed."""

    def __init__(self, message: str, other_exporter: str | None = None) -> None:
        super().__init__(message)
        self.other_exporter = other_exporter


def dynamic_dims(axes: Iterable[int], example: torch.Tensor) -> tuple[int, ...]:
    """The input dimensions ``axes`` (sorted, once each); ExportFailed if one is not a dimension of ``example``."""
    axes = list(axes)
    wrong = [d for d in axes if not 0 <= d < example.dim()]
    if wrong:
        raise ExportFailed(f"dynamic_axes: {wrong} not a dimension of the input (shape {tuple(example.shape)})")
    return tuple(sorted(set(axes)))


def exporter_for(runtime: str, exporter: str) -> str:
    """The exporter ``auto`` stands for: OpenVINO's own converter for ``openvino``, dynamo for ONNX Runtime."""
    if exporter != "auto":
        return exporter
    return "openvino" if runtime == "openvino" else "dynamo"


def export(
    source: nn.Module, example: torch.Tensor, runtime: str, opset: int, exporter: str, dims: tuple[int, ...]
) -> RuntimeModel:
    """The float model ``source`` (on the CPU, in eval mode) exported on ``example`` (to ONNX, or with
    ``exporter`` openvino straight to OpenVINO's IR), its input axes ``dims`` dynamic, in a
    :class:`RuntimeModel` of ``runtime`` (parity not checked: :func:`check_parity`)."""
    exporter = exporter_for(runtime, exporter)
    if exporter == "openvino":
        return _converted(source, example, dims, runtime)
    try:
        onnx_bytes = to_onnx(source, example, opset, exporter, dims)
    except Exception as exc:  # the exporter fails in many ways; say which exporter and what to try
        raise ExportFailed(
            f"export to ONNX ({exporter} exporter, opset {opset}) failed: {first_line(exc, typed=True)}",
            "torchscript" if exporter == "dynamo" else "dynamo",
        ) from exc
    info = {**graph_info(onnx_bytes), "macs": count_macs(source, example[:1]), "version": version(runtime), "exporter": exporter}
    return wrap(runtime, onnx_bytes, info)


def _converted(source: nn.Module, example: torch.Tensor, dims: tuple[int, ...], runtime: str) -> RuntimeModel:
    if runtime != "openvino":
        raise ExportFailed(f"exporter openvino converts to OpenVINO's IR: it needs runtime openvino, not {runtime}")
    from ._ov import convert

    try:
        with _quiet():
            deployed = convert(source, example, dims)
    except Exception as exc:  # the converter fails in many ways; the ONNX route may work
        raise ExportFailed(f"OpenVINO's converter (ov.convert_model) failed: {first_line(exc, typed=True)}", "dynamo") from exc
    deployed.info.update(macs=count_macs(source, example[:1]), version=version(runtime), exporter="openvino")
    return deployed


def check_parity(source: nn.Module, deployed: RuntimeModel, example: torch.Tensor, tolerance: float) -> tuple[float, float]:
    """(largest difference, allowed difference) between ``deployed``'s and ``source``'s outputs on ``example``, in
    each session that can run it (:meth:`RuntimeModel.each_session`); ExportFailed when the shapes differ or the
    difference exceeds ``tolerance`` x the largest output (at least 1)."""
    runtime = deployed.runtime
    with torch.inference_mode():
        expected, outputs = source(example), deployed.each_session(example)
    largest = 0.0
    for session, got in outputs.items():
        if _shapes(expected) != _shapes(got):
            raise ExportFailed(f"{runtime} returns outputs of shapes {_shapes(got)} in {session}, torch {_shapes(expected)}")
        diff, scale = largest_difference(expected, got)
        allowed = tolerance * max(1.0, scale)
        if not diff <= allowed:
            raise ExportFailed(
                f"{runtime}'s outputs differ from torch's by up to {diff:.3g} on the example inputs in "
                f"{session} (allowed: {allowed:.3g}, tolerance {tolerance} x the largest output {scale:.3g})"
            )
        largest = max(largest, diff)
    return largest, allowed


def wrap(runtime: str, onnx_bytes: bytes, info: Mapping[str, Any]) -> RuntimeModel:
    """The ONNX model in a :class:`RuntimeModel` of ``runtime`` (converted to OpenVINO's IR for ``openvino``)."""
    if runtime == "openvino":
        from ._ov import from_onnx

        return from_onnx(onnx_bytes, dict(info))
    from ._ort import OnnxRuntimeModel

    return OnnxRuntimeModel({"onnx": onnx_bytes}, info)


def _shapes(output: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _flat(output)]
