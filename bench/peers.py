"""The peers as a user would run them without torchslim: each runtime's own export and int8 quantization,
written from their documentation, with the runtime's default settings (only the thread count set): one
session for every input shape.

The results are wrapped in torchslim's runtime modules so that every variant is timed by the same loop;
the OpenVINO one keeps OpenVINO's default inference precision (bf16 for unquantized ops on CPUs with
AVX512-BF16), where torchslim's deploy stage asks for f32.
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


class DefaultOpenVino(OpenVinoModel):
    """An OpenVINO model compiled with OpenVINO's defaults, one stream and ``threads`` threads."""

    def _open(self, threads: int, shape: tuple[int, ...] | None) -> Any:
        return compiled(self.ov_model(shape), {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})


def _info(example: torch.Tensor) -> dict[str, Any]:
    # static_shapes 0: the peers run every shape in the session of their dynamic axes, as the runtimes do.
    return {"inputs": {"input": ["batch", "sequence"][: example.dim()]}, "outputs": {"output": ["batch"]}, "opset": 18,
            "static_shapes": 0}


def ort_dynamic_int8(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.onnx.export (dynamo, batch and sequence dynamic) then onnxruntime's quantize_dynamic, per channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "model.onnx", Path(folder) / "int8.onnx"
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        torch.onnx.export(model, (example,), str(source), dynamo=True, input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: batch, 1: sequence},))
        quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8)
        return OnnxRuntimeModel({"onnx": target.read_bytes()}, _info(example))


def nncf_int8(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], transformer: bool) -> nn.Module:
    """openvino.convert_model straight from torch, then nncf.quantize on the calibration inputs."""
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=example)
    arrays = [np.ascontiguousarray(batch.numpy()) for batch in calibration]
    options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(ov_model, nncf.Dataset(arrays), subset_size=len(arrays), **options)
    return DefaultOpenVino(ir_files(quantized), _info(example))
