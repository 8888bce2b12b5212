"""Binary activations (XNOR-Net): a binarized layer's inputs become ``sign(x) * K``.

``K`` is the mean |x| of each sample over the layer's input features: the last dimension for a
Linear, channels x height x width for a Conv2d. XNOR-Net's K for a convolution is a spatial map
(the channel mean of |x| box-filtered by the kernel); one scalar per sample is cheaper, exact for a
Linear and the same rule for both layer types. ``sign(0)`` is 0 (torch's sign): behind a ReLU the
inputs are then ``{0, K}`` (active or not), elsewhere ``{-K, +K}``; a sign with ``sign(0) = +1``
would turn every ReLU output into the same constant.

Training uses the straight-through estimator of binarized networks (Courbariaux et al., 2016;
XNOR-Net): the gradient passes the sign as the clipped identity, 1 where ``|x| <= 1``, 0 elsewhere.
``K`` is a per-sample constant in the backward pass, as in XNOR-Net's own layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .._layers import feed_inputs


class _SignSTE(torch.autograd.Function):
    """sign(x) forward; the clipped identity (1 where |x| <= 1) backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = ctx.saved_tensors[0]
        return grad * (x.abs() <= 1).to(grad.dtype)


def input_dims(layer: nn.Module) -> tuple[int, ...]:
    """The dimensions of ``layer``'s input that hold its input features (a sample's scale is their mean)."""
    return (-3, -2, -1) if hasattr(layer, "in_channels") else (-1,)  # a Conv2d or a packed one


def binarize(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``sign(x) * mean|x|`` over ``dims`` (per sample), with the straight-through gradient of the sign."""
    scale = x.detach().abs().mean(dims, keepdim=True)
    signs: torch.Tensor = _SignSTE.apply(x)
    return signs * scale


@contextmanager
def binary_inputs(layers: list[nn.Module]) -> Iterator[None]:
    """Within the block, ``layers`` (float Linear/Conv2d, as in quantization-aware training) see binarized inputs."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (binarize(args[0], input_dims(module)), *args[1:])

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fed_by_model_input(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, bool]:
    """For each of ``names`` that runs on ``example``: whether its input is the model's input itself
    (the raw data, possibly reshaped: same storage) rather than another layer's activations."""
    layers = dict(model.named_modules())
    named, seen = {layers[n]: n for n in names}, {}
    storage = example.untyped_storage().data_ptr()

    def take(layer: nn.Module, x: torch.Tensor) -> None:
        seen[named[layer]] = x.untyped_storage().data_ptr() == storage

    training = model.training
    try:
        feed_inputs(model.eval(), named, [example], take)
    finally:
        model.train(training)
    return seen
