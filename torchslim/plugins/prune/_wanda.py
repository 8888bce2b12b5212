"""Activation-aware unstructured pruning: a weight's importance is |w| times the norm of its input.

The criterion of Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"
(2023, "Wanda"): weight ``W[i, j]`` scores ``|W[i, j]| * ||X[:, j]||``, where ``X[:, j]`` is
input feature ``j`` over every token of the calibration data, and each output row loses its
lowest-scoring fraction. Magnitude alone prunes small weights that multiply large activations
(transformers have a few input features far larger than the rest); the activation norm keeps them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .._layers import feed_inputs, weight_of


def input_norms(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The L2 norm of each input feature of every layer in ``layers`` over all rows of the batches' inputs.

    Raises ValueError naming the layers that never ran (or if no batch came).
    """
    sums: dict[str, torch.Tensor] = {}
    names = {layer: name for name, layer in layers.items()}

    def take(layer: nn.Module, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        sums[names[layer]] = sums.get(names[layer], 0) + (rows**2).sum(dim=0)

    feed_inputs(model, layers.values(), batches, take)
    idle = [name for name in layers if name not in sums]
    if idle:
        raise ValueError(f"these layers never ran in the forward pass, so their inputs cannot be scored: {', '.join(idle)}")
    return {name: total.sqrt() for name, total in sums.items()}


def prune_rows(layer: nn.Module, norm: torch.Tensor, amount: float) -> None:
    """Zero the ``amount`` lowest-scoring weights of every output row of ``layer`` (score |w| * norm)."""
    weight = weight_of(layer)
    count = round(amount * weight.shape[1])
    if count <= 0:
        return
    with torch.no_grad():
        score = weight.abs() * norm.to(weight.device)[None, :]
        lowest = torch.topk(score, count, dim=1, largest=False).indices
        weight.scatter_(1, lowest, 0.0)
