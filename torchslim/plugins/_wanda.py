"""Activation-aware unstructured pruning: a weight's importance is |w| times the norm of its input.

The criterion of Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"
(2023, "Wanda"): weight ``W[i, j]`` scores ``|W[i, j]| * ||X[:, j]||``, where ``X[:, j]`` is
input feature ``j`` over every token of the calibration data, and each output row loses its
lowest-scoring fraction. Magnitude alone prunes small weights that multiply large activations
(transformers have a few input features far larger than the rest); the activation norm keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ._layers import weight_of


def input_norms(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The L2 norm of each input feature of every layer in ``layers`` over all rows of the batches' inputs.

    Raises ValueError naming the layers that never ran (or if no batch came).
    """
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (rows**2).sum(dim=0)
        return hook

    hooks = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    seen = 0
    try:
        with torch.no_grad():
            for inputs in batches:
                model(inputs.to(device))
                seen += 1
    finally:
        for handle in hooks:
            handle.remove()
    if not seen:
        raise ValueError("the calibration data yielded no batch")
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
