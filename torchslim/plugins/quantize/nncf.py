"""``method: nncf``: OpenVINO's post-training int8 quantization (NNCF) of a model deployed to OpenVINO
(extra ``[openvino]``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr
from torch import nn

from ...engine.stage import Context
from ._backends import Quantized
from .runtime import RuntimeQuantize, calibration_arrays, census_of, quiet_library

#: OpenVINO ops with a weight input (input 1).
_WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")
#: Ops that mark an attention model: a Softmax (graphs through ONNX) or OpenVINO's fused attention op
#: (graphs from OpenVINO's own converter).
_ATTENTION = ("Softmax", "ScaledDotProductAttention")
#: Ops between a weight and its layer in a quantized IR (decompression and fake quantization).
_PATH = ("Convert", "Subtract", "Multiply", "Reshape", "FakeQuantize", "Transpose")


class NncfQuantize(RuntimeQuantize):
    """NNCF post-training quantization: int8 weights and activations in OpenVINO, calibrated on the
    calibration data (``nncf.quantize``, with its fast bias correction)."""

    runtime: ClassVar[str] = "openvino"
    requires: ClassVar[str] = "nncf"

    method: Literal["nncf"] = "nncf"
    """``nncf``: OpenVINO's NNCF post-training int8 (after ``deploy`` with ``runtime: openvino``)."""
    preset: Literal["auto", "performance", "mixed"] = "auto"
    """``performance``: symmetric weights and activations; ``mixed``: asymmetric activations (for
    activations that are not centred on zero, e.g. after GELU). ``auto``: NNCF's own choice, mixed for
    the transformer scheme and performance otherwise (performance loses much of a transformer's accuracy:
    docs/deploy.md)."""
    calibration_batches: int = Field(default=32, ge=1)
    """Batches of the calibration data run to find the activations' ranges."""
    model_type: Literal["auto", "transformer", "default"] = "auto"
    """``transformer`` uses NNCF's transformer scheme (``ModelType.TRANSFORMER``: softmax, layer norms and
    the attention's activation-by-activation products left float, SmoothQuant); ``default`` quantizes
    every supported op. ``auto``: transformer when the graph has attention (a Softmax, or OpenVINO's fused
    attention op): the default scheme ruins an attention model's accuracy (docs/deploy.md, Transformers)."""

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        import nncf

        from ..deploy import OpenVinoModel, ir_files

        arrays = calibration_arrays(ctx, self.calibration_batches)
        source = model.ov_model()  # type: ignore[operator]
        kind = self._model_type(source)
        options: dict[str, Any] = {"model_type": nncf.ModelType.TRANSFORMER} if kind == "transformer" else {}
        if self.preset != "auto":
            options["preset"] = getattr(nncf.QuantizationPreset, self.preset.upper())
        with quiet_library():
            ir = nncf.quantize(source, nncf.Dataset(arrays), subset_size=len(arrays), **options)
        self._scheme = kind
        quantized = OpenVinoModel(ir_files(ir), model.info)  # type: ignore[arg-type]
        self._report(quantized, ctx)
        return Quantized(quantized, quantized.restore_record(), census_of(_layers(ir)))

    _scheme: str = PrivateAttr(default="")  # the scheme auto chose, for the census note

    def _model_type(self, ir: Any) -> str:
        if self.model_type != "auto":
            return self.model_type
        return "transformer" if any(op.get_type_name() in _ATTENTION for op in ir.get_ordered_ops()) else "default"

    def _verb(self) -> str:
        scheme = self._scheme or self.model_type
        why = " (attention in the graph)" if self.model_type == "auto" and scheme == "transformer" else ""
        scheme = f", {scheme} scheme{why}"
        preset = self.preset if self.preset != "auto" else ("mixed" if self._scheme == "transformer" else "performance")
        return f"quantized (NNCF int8, preset {preset}{scheme})"


def _layers(ir: Any) -> Iterator[tuple[str, str, bool]]:
    for op in ir.get_ordered_ops():
        if op.get_type_name() in _WEIGHTED:
            yield op.get_friendly_name(), op.get_type_name(), _is_int8(op.input_value(1).get_node())


def _is_int8(node: Any) -> bool:
    """True when the weight path holds a FakeQuantize or an 8-bit constant."""
    while node.get_type_name() in _PATH:
        if node.get_type_name() == "FakeQuantize":
            return True
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant" and str(node.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>")
