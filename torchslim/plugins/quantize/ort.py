"""``method: ort_static`` and ``ort_dynamic``: ONNX Runtime's own int8 quantization of a model
deployed to ONNX Runtime (``onnxruntime.quantization``; extra ``[onnx]``)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import nn

from ...engine.stage import Context
from ._backends import Census, Quantized
from .runtime import RuntimeQuantize, calibration_arrays, census_of, quiet_library

#: ONNX ops with a weight matrix (input 1) that ONNX Runtime quantizes.
_WEIGHTED = ("Conv", "Gemm", "MatMul")
#: Ops that are quantized layers themselves (dynamic quantization's and the QOperator format's).
_INTEGER = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


class OrtQuantize(RuntimeQuantize):
    """What both ONNX Runtime methods share: the files, the census, the restore record."""

    runtime: ClassVar[str] = "onnxruntime"
    requires: ClassVar[str] = "onnxruntime.quantization"

    per_channel: bool = True
    """One scale per output channel of each weight (else one per tensor)."""

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        from ..deploy import wrap

        with tempfile.TemporaryDirectory() as folder:
            source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
            source.write_bytes(model.file("onnx"))  # type: ignore[operator]
            with quiet_library():
                self._run_library(source, target, model, ctx)
            quantized = wrap("onnxruntime", target.read_bytes(), model.info)  # type: ignore[arg-type]
        self._report(quantized, ctx)
        return Quantized(quantized, quantized.restore_record(), _census(quantized.file("onnx")))

    def _run_library(self, source: Path, target: Path, model: nn.Module, ctx: Context) -> None:
        """Quantize the ONNX file ``source`` into ``target``."""
        raise NotImplementedError


class OrtStaticQuantize(OrtQuantize):
    """ONNX Runtime static quantization (QDQ format): int8 weights and activations, the activations'
    ranges calibrated on the calibration data."""

    method: Literal["ort_static"] = "ort_static"
    """``ort_static``: ONNX Runtime's static QDQ int8, calibrated (after ``deploy`` with ``runtime: onnxruntime``)."""
    activations: Literal["uint8", "int8"] = "uint8"
    """Activation type: ``uint8`` (with int8 weights, the fast pairing on x86 VNNI) or ``int8``."""
    calibration_batches: int = Field(default=32, ge=1)
    """Batches of the calibration data run to find the activations' ranges."""

    def _run_library(self, source: Path, target: Path, model: nn.Module, ctx: Context) -> None:
        from onnxruntime import quantization as q

        arrays = calibration_arrays(ctx, self.calibration_batches)
        name = next(iter(model.info["inputs"]))  # type: ignore[index]
        reader = _Reader([{name: array} for array in arrays])
        activation = q.QuantType.QUInt8 if self.activations == "uint8" else q.QuantType.QInt8
        nodes = _weight_layers_of_transformer(source.read_bytes())
        if nodes:
            ctx.note(
                f"{self.label}: a Softmax in the graph (attention): only the {len(nodes)} layers with weights are "
                "quantized (quantizing every op ruins attention's accuracy; method ort_dynamic keeps more of it: "
                "docs/deploy.md, Transformers)"
            )
        q.quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=q.QuantFormat.QDQ,
            per_channel=self.per_channel,
            activation_type=activation,
            weight_type=q.QuantType.QInt8,
            nodes_to_quantize=nodes or None,
        )

    def _verb(self) -> str:
        return f"quantized (ONNX Runtime static QDQ, int8 weights, {self.activations} activations)"


def _weight_layers_of_transformer(onnx_bytes: bytes) -> list[str]:
    """The names of the Conv/Gemm/MatMul nodes with a weight, when the graph has a Softmax; else none.

    Quantizing every op of an attention block (softmax, layer norm inputs, the score products) with
    static ranges ruins it; its weighted layers quantize well."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    if not any(node.op_type == "Softmax" for node in graph.node):
        return []
    weights = {init.name for init in graph.initializer}
    return [node.name for node in graph.node if node.op_type in _WEIGHTED and len(node.input) > 1 and node.input[1] in weights]


class OrtDynamicQuantize(OrtQuantize):
    """ONNX Runtime dynamic quantization: int8 weights, activations quantized on the fly (MatMul, Gemm)."""

    method: Literal["ort_dynamic"] = "ort_dynamic"
    """``ort_dynamic``: ONNX Runtime's dynamic int8 (after ``deploy`` with ``runtime: onnxruntime``)."""

    def _run_library(self, source: Path, target: Path, model: nn.Module, ctx: Context) -> None:
        from onnxruntime import quantization as q

        q.quantize_dynamic(str(source), str(target), per_channel=self.per_channel, weight_type=q.QuantType.QInt8)

    def _verb(self) -> str:
        return "quantized (ONNX Runtime dynamic, int8 weights)"


class _Reader:
    """ONNX Runtime's calibration data reader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        """The next feed, or None at the end."""
        return next(self._feeds, None)


def _census(onnx_bytes: bytes) -> Census:
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return census_of(_layers(graph, dequantized))


def _layers(graph: Any, dequantized: set[str]) -> Iterator[tuple[str, str, bool]]:
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if node.op_type in _INTEGER:
            yield name, node.op_type, True
        elif node.op_type in _WEIGHTED and len(node.input) > 1:
            yield name, node.op_type, node.input[1] in dequantized
