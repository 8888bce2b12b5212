"""``method: weight_only``: int8 embedding tables with a float scale per row (plain torch, no torch.ao)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import nn

from ...engine.stage import Context
from ._backends import Quantized, module_types, take_census
from .base import LayerQuantize

#: Layer types weight-only quantization swaps for an int8 version.
WEIGHT_ONLY_TYPES = ("Embedding",)


class WeightOnlyQuantize(LayerQuantize):
    """Weight-only quantization of embedding tables: int8 rows, one float scale per row.

    A lookup reads a quarter of the bytes; the rest of the model stays as it was.
    """

    supported: ClassVar[tuple[str, ...]] = WEIGHT_ONLY_TYPES

    method: Literal["weight_only"] = "weight_only"
    """``weight_only``: int8 embedding tables with a float scale per row."""
    modules: list[str] = Field(default_factory=lambda: list(WEIGHT_ONLY_TYPES))
    """Layer types (torch.nn class names) to quantize: ``[Embedding]``, the only one supported."""
    dtype: Literal["qint8"] = "qint8"
    """Weight type: ``qint8``."""

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        from ._modules import Int8Embedding, embedding_refusal

        names = []
        for name, module in self._targets(model):
            reason = embedding_refusal(module)  # type: ignore[arg-type]
            if reason:
                ctx.note(f"{self.label}: {name} stays float: {reason}")
            else:
                names.append(name)
        quantized = _swap_embeddings(copy.deepcopy(model), names)
        census = take_census(module_types(model), quantized, lambda m: isinstance(m, Int8Embedding))
        return Quantized(quantized, {"embeddings": names}, census)

    def _restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        names = record.get("embeddings") or [name for name, _ in self._targets(model)]
        return _swap_embeddings(model, names)

    def _verb(self) -> str:
        return "quantized (int8 weights, a float scale per row)"


def _swap_embeddings(model: nn.Module, names: list[str]) -> nn.Module:
    from ._modules import Int8Embedding

    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, Int8Embedding.from_float(getattr(parent, attr)))
    return model
