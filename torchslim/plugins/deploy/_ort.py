"""ONNX Runtime as a deployment target: the ONNX file in a :class:`RuntimeModel`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from .extras import require
from .runtime import RuntimeModel, is_weight

#: Inputs of these ops are quantization parameters (scale, zero point), not weights.
_QUANT_OPS = ("DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear")


class OnnxRuntimeModel(RuntimeModel):
    """An ONNX model run by ONNX Runtime's CPU execution provider."""

    runtime: ClassVar[str] = "onnxruntime"
    suffixes: ClassVar[dict[str, str]] = {"onnx": "model.onnx"}
    # ONNX Runtime's idle workers spin for 30-60 ms after a run (its default, kept: without it its own batch-1
    # latency at 2 threads went from 2.49 to 3.84 ms on MiniLM); a torch model timed right after one ran
    # 2.2x slower at 2 threads (30.3 vs 13.9 ms), after a 60 ms wait as fast as alone (measured 2026-11-29).
    settle_seconds: ClassVar[float] = 0.1

    def _open(self, threads: int, shape: tuple[int, ...] | None) -> Any:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        # One op at a time, each on `threads` threads: what the engine's thread setting means for torch.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        for name, size in self._fixed_axes(shape):
            options.add_free_dimension_override_by_name(name, size)
        session = ort.InferenceSession(self.file("onnx"), options, providers=["CPUExecutionProvider"])
        # the input's and the outputs' names read once, not on every call
        return session, session.get_inputs()[0].name, [output.name for output in session.get_outputs()]

    def _fixed_axes(self, shape: tuple[int, ...] | None) -> list[tuple[str, int]]:
        """(axis name, size) of each dynamic input axis (``batch``, ``sequence``) fixed to ``shape``'s."""
        if shape is None:
            return []
        dims: list[Any] = next(iter(self.info.get("inputs", {}).values()), [])
        return [(dim, size) for dim, size in zip(dims, shape, strict=False) if isinstance(dim, str)]

    def _run(self, session: Any, array: np.ndarray) -> list[np.ndarray]:
        runner, name, outputs = session
        return runner.run(outputs, {name: array})  # type: ignore[no-any-return]

    def _constants(self) -> Iterator[np.ndarray]:
        onnx = require("onnx")
        from onnx import numpy_helper

        graph = onnx.load_from_string(self.file("onnx")).graph
        params = {name for node in graph.node if node.op_type in _QUANT_OPS for name in node.input[1:]}
        for tensor in graph.initializer:
            array = numpy_helper.to_array(tensor)
            if tensor.name not in params and is_weight(array):
                yield array
