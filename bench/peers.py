"""The peers as a user would run them without torchslim: each runtime's own export and int8 quantization,
written from their documentation, with the runtime's default settings (only the thread count set).

Each OpenVINO peer is NNCF's int8 (transformer scheme where asked) of one way into OpenVINO a user would
take: ``ov.convert_model`` of the torch model, or OpenVINO reading the ONNX export; and the first of them
once more compiled for each input shape it is given (``model.reshape`` before ``compile_model``, which a
user of OpenVINO can do by hand, and which torchslim's runtime modules do for the first shapes they see).
The others run every shape in one session of their dynamic axes, as the runtimes do by default.

The results are wrapped in torchslim's runtime modules so that every variant is timed by the same loop
(and pays the same small cost per call: bench/overhead_bench.py); the OpenVINO ones keep OpenVINO's
default inference precision (bf16 for unquantized ops on CPUs with AVX512-BF16), where torchslim's deploy
stage asks for f32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.plugins.deploy._ort import OnnxRuntimeModel
from torchslim.plugins.deploy._ov import OpenVinoModel, compiled, ir_files
from torchslim.plugins.deploy.runtime import STATIC_SHAPES


class DefaultOpenVino(OpenVinoModel):
    """An OpenVINO model compiled with OpenVINO's defaults, one stream and ``threads`` threads."""

    def _compile(self, threads: int, shape: tuple[int, ...] | None) -> Any:
        return compiled(self.ov_model(shape), {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})


def _info(example: torch.Tensor, static_shapes: int = 0) -> dict[str, Any]:
    # static_shapes 0: every shape runs in the session of the dynamic axes, as the runtimes do.
    return {
        "inputs": {"input": ["batch", "sequence"][: example.dim()]},
        "outputs": {"output": ["batch"]},
        "opset": 18,
        "static_shapes": static_shapes,
    }


def onnx_export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.onnx.export (dynamo), the batch and sequence axes dynamic, input and output named."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=({0: batch, 1: sequence},),
    )


def ort_dynamic_int8(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.onnx.export then onnxruntime's quantize_dynamic, per channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "model.onnx", Path(folder) / "int8.onnx"
        onnx_export(model, example, source)
        quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8)
        return OnnxRuntimeModel({"onnx": target.read_bytes()}, _info(example))


def nncf_int8(
    model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], transformer: bool, via_onnx: bool = False
) -> DefaultOpenVino:
    """openvino.convert_model straight from torch (or, ``via_onnx``, OpenVINO reading the ONNX export), then
    nncf.quantize on the calibration inputs."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as folder:
        if via_onnx:
            onnx_export(model, example, Path(folder) / "model.onnx")
            ov_model = ov.Core().read_model(str(Path(folder) / "model.onnx"))
        else:
            ov_model = ov.convert_model(model, example_input=example)
        return DefaultOpenVino(ir_files(_quantized(ov_model, calibration, transformer)), _info(example))


def per_shape(peer: DefaultOpenVino, example: torch.Tensor) -> DefaultOpenVino:
    """The same IR as ``peer``, compiled for each of the first input shapes it is given (the IR reshaped to the
    shape before compiling), as torchslim's runtime modules run theirs."""
    return DefaultOpenVino({name: peer.file(name) for name in peer.suffixes}, _info(example, STATIC_SHAPES))


def _quantized(ov_model: Any, calibration: list[torch.Tensor], transformer: bool) -> Any:
    import nncf

    arrays = [np.ascontiguousarray(batch.numpy()) for batch in calibration]
    options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    return nncf.quantize(ov_model, nncf.Dataset(arrays), subset_size=len(arrays), **options)
