"""Token-id models through the runtimes: calibration keeps the ids integers, and attention graphs get the
quantization scheme that keeps them accurate (NNCF's transformer scheme, ONNX Runtime's weighted layers only)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.engine.metrics import accuracy
from torchslim.examples import digits
from torchslim.plugins.deploy import DeployStage
from torchslim.plugins.quantize import QuantizeStage

from .conftest import make_ctx
from .test_deploy import _needs

pytestmark = pytest.mark.usefixtures("one_thread")


class PixelAttention(nn.Module):
    """The 64 pixels of a digit as tokens (position + intensity 0..16), one attention layer, a head on all tokens."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.table = nn.Embedding(17, dim)
        self.position = nn.Parameter(torch.zeros(digits.PIXELS, dim))
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(digits.PIXELS * dim, digits.CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.table(ids) + self.position[: ids.shape[1]]
        scores = self.query(x) @ self.key(x).transpose(1, 2) / x.shape[-1] ** 0.5
        x = self.norm(x + torch.softmax(scores, dim=-1) @ self.value(x))
        return self.head(x.flatten(1))


@pytest.fixture(scope="module")
def tokens() -> dict[str, DataLoader]:
    """The digits as int64 token ids (intensity 0..16 per pixel)."""
    loaders = {}
    for name, part in digits.split().items():
        images, labels = part.tensors
        loaders[name] = DataLoader(TensorDataset((images * 16).round().long(), labels), batch_size=64)
    loaders["calibration"] = loaders["train"]
    return loaders


@pytest.fixture(scope="module")
def attention(tokens: dict[str, DataLoader]) -> nn.Module:
    torch.manual_seed(0)
    model = PixelAttention()
    digits.fit(model, tokens["train"], epochs=4, lr=1e-2)
    return model.eval()


def _quantized(model: nn.Module, data: dict[str, Any], runtime: str, method: str) -> tuple[nn.Module, list[str]]:
    ctx = make_ctx(model, data)
    deployed = DeployStage(runtime=runtime).apply(model, ctx.for_stage())
    quantize = ctx.for_stage()
    result = QuantizeStage.from_options(method=method, calibration_batches=4).apply(deployed, quantize)
    return result, quantize.notes


@pytest.mark.parametrize(
    ("runtime", "method", "says"),
    [
        pytest.param("onnxruntime", "ort_static", "only the 4 layers with weights are quantized", marks=_needs("onnxruntime")),
        pytest.param("openvino", "nncf", "transformer scheme (attention in the graph)", marks=_needs("openvino")),
    ],
)
def test_attention_model_quantizes_in_runtime_with_token_ids(
    attention: nn.Module, tokens: dict, runtime: str, method: str, says: str
) -> None:
    float_accuracy = accuracy(attention, tokens["eval"])
    assert float_accuracy > 90  # trained: a quantization that ruins it would show
    quantized, notes = _quantized(attention, tokens, runtime, method)
    assert any(says in note for note in notes), notes
    assert accuracy(quantized, tokens["eval"]) >= float_accuracy - 3
