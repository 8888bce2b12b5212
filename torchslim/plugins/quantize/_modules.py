"""Quantized layers torchslim writes itself (plain torch, no torch.ao): int8 embeddings, half precision.

torch's quantized Embedding packs its table into an opaque object and needs the
deprecated ``torch.ao`` stack; a gather from an int8 table times one float per row
is all weight-only embedding quantization is, so it is written out here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one float32 scale per row (symmetric, zero point 0).

    A lookup gathers the int8 rows and multiplies each by its scale: a quarter of the
    float32 table's memory, and the gather reads four times fewer bytes.
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        """Quantize ``embedding``'s table row by row: scale = max |w| / 127."""
        weight = embedding.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        layer.qweight.copy_(torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        layer.scales.copy_(scales)
        return layer

    def weight(self) -> torch.Tensor:
        """The dequantized float table (what the metrics count, like torch's packed quantized layers)."""
        return self.qweight.float() * self.scales[:, None]

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the table for ``indices``, as float32."""
        rows = F.embedding(indices, self.qweight).to(self.scales.dtype)
        return rows * self.scales[indices].unsqueeze(-1)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 weights, float scale per row"


def embedding_refusal(embedding: nn.Embedding) -> str | None:
    """Why ``embedding`` cannot be swapped for :class:`Int8Embedding`, or None if it can."""
    if embedding.max_norm is not None:
        return "max_norm renormalizes the float table in place at every lookup"
    if embedding.weight.dtype != torch.float32:
        return f"its table is {embedding.weight.dtype}, not float32"
    return None


class HalfPrecision(nn.Module):
    """Runs the wrapped model in float16 or bfloat16: float inputs are cast down, float outputs back to float32.

    Callers (the evaluation, the latency measurement, the user's pipeline) keep feeding
    and receiving float32 tensors; integer inputs such as token ids pass unchanged.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Cast in, run, cast out."""
        args = _cast(args, self.dtype)
        kwargs = _cast(kwargs, self.dtype)
        return _cast(self.model(*args, **kwargs), torch.float32)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"dtype={self.dtype}"


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
