"""GPTQ-style error-compensating rounding (Frantar et al., 2022), layer by layer on calibration inputs.

Each layer's columns are rounded in order; the rounding error of a column is spread over the
columns not yet rounded, weighted by the inverse Hessian ``2 X^T X`` of the layer's inputs, so the
layer's outputs on the calibration data move less than with round-to-nearest. Layers are done in
model order, each seeing the inputs its already-rounded predecessors produce. Scales are fixed
from the float weights first ("static groups"), so codes and scales stay those of the format.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import weight_of
from .formats import Format, QWeight, dequantize, encode, quantize, scales


def gptq_round(model: nn.Module, formats: dict[str, Format], batches: Iterable[torch.Tensor], damp: float) -> dict[str, QWeight]:
    """Codes of every ``formats`` layer; the layers' weights are left rounded (the caller swaps them out)."""
    inputs = list(batches)
    layers = dict(model.named_modules())
    result = {}
    for name, fmt in formats.items():
        layer = layers[name]
        weight = weight_of(layer).detach().reshape(weight_of(layer).shape[0], -1).float()
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            result[name] = quantize(weight, fmt)  # grouped convolutions: nearest (one Hessian per group not done)
        else:
            result[name] = _layer(weight, hessian(model, layer, inputs), fmt, damp)
        with torch.no_grad():  # later layers see this layer's rounded outputs
            weight_of(layer).copy_(dequantize(result[name]).view_as(weight_of(layer)))
    return result


def hessian(model: nn.Module, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``2 X^T X / n`` of the layer's inputs (unfolded patches for a convolution) over ``inputs``."""
    total: list[torch.Tensor] = []
    count = [0]

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = _rows(module, args[0].detach().float())
        total.append(x.t() @ x)
        count[0] += x.shape[0]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in inputs:
                model(batch.to(weight_of(layer).device))
    finally:
        handle.remove()
    return 2 * torch.stack(total).sum(0) / max(count[0], 1)


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # type: ignore[arg-type]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _layer(weight: torch.Tensor, h: torch.Tensor, fmt: Format, damp: float) -> QWeight:
    w, h = weight.clone(), h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], device=h.device)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    grouped = weight.view(weight.shape[0], fmt.groups(weight.shape[1]), -1)
    scale, zero = scales(grouped, fmt)
    size = weight.shape[1] // scale.shape[1]
    for i in range(w.shape[1]):
        g = i // size
        z = zero[:, g : g + 1] if isinstance(zero, torch.Tensor) else zero
        code = encode(w[:, i].view(-1, 1, 1), scale[:, g : g + 1], z, fmt).float().view(-1)
        rounded = (code - (z.view(-1) if isinstance(z, torch.Tensor) else z)) * scale[:, g]
        error = (w[:, i] - rounded) / inverse[i, i]
        w[:, i:] -= error[:, None] * inverse[i, i:][None, :]
        w[:, i] = rounded
    return QWeight(encode(w.view_as(grouped), scale, zero, fmt).view(weight.shape), scale, zero)
