"""Export a float torch model to ONNX (dynamic batch axis), and check a runtime against torch."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .extras import require


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
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=(shapes,),
                                input_names=["input"], output_names=["output"], verbose=False)
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
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_axes=axes)
        return path.read_bytes()


class _quiet:
    """Silence the exporter's progress lines and warnings (torchvision ops skipped, opset conversion):
    they say nothing about this model, and a failure raises anyway."""

    def __enter__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
        self._levels = [logger.level for logger in self._loggers]
        for logger in self._loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        for logger, level in zip(self._loggers, self._levels, strict=True):
            logger.setLevel(level)
        self._warnings.__exit__(*exc)


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
