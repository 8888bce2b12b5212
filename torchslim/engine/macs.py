"""Multiply-accumulates of one forward pass: every matrix product, attention's included.

Two counters, one forward pass. torch's FLOP counter (``FlopCounterMode``) sees every matrix
product dispatched as an aten op: Linear and Conv, and also attention's ``matmul``/``bmm`` and
``scaled_dot_product_attention``, which hooks on Linear and Conv modules never see. It cannot
see the kernels of quantized layers (``quantized::linear_dynamic``, packed convs), so a forward
hook on each Linear- or Conv-like module counts the layers inside which the FLOP counter saw
nothing. Recurrent layers (LSTM, GRU, RNN and their cells, float or torch.ao's dynamic int8) are
counted by their formula, whatever the FLOP counter saw of them: it sees GRU's and RNN's matrix
products but not CPU LSTM's oneDNN kernel nor any quantized one. A model that cannot be counted this
way (a compiled graph) may count itself: a module with a ``counted_macs(example)`` method is asked instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from .hooks import ConvShaped, CountsMacs, LinearShaped, PackedRecurrent

__all__ = ["count_macs"]


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # torch's FLOP table knows the CUDA attention kernels but not the CPU one (torch 2.13).
    return int(flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))


_CUSTOM: dict[Any, Any] = {}
#: Gates of torch's recurrent layers by their ``mode`` (nn.RNNBase's, and torch.ao's dynamic LSTM/GRU):
#: each gate is one input and one hidden matrix product per time step.
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


def count_macs(model: nn.Module, example: torch.Tensor) -> int | None:
    """Multiply-accumulates per input sample (dense: zeros count): FLOPs / 2 of every matrix product
    torch's FLOP counter sees, plus the Linear and Conv layers whose kernels it cannot see.

    None (not measured) when nothing was counted although the model holds weight matrices: its
    layers ran where neither counter can look (e.g. a compiled graph), and 0 would be a lie.
    """
    if isinstance(model, CountsMacs):
        value = model.counted_macs(example)
        return None if value is None else int(value)
    example = example.to(_device(model))
    try:
        # With grad enabled, MultiheadAttention and TransformerEncoderLayer take their composite
        # path (visible aten ops) instead of one fused inference kernel the counter cannot see.
        total = _count(model, example, torch.enable_grad)
    except RuntimeError:  # e.g. inference tensors that cannot take part in autograd
        total = _count(model, example, torch.inference_mode)
    if total == 0 and any(t.dim() >= 2 for t in model.parameters()):
        return None
    return total // max(1, example.shape[0])


def _count(model: nn.Module, example: torch.Tensor, grad_mode: Any) -> int:
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    hooked = 0
    starts: dict[int, int] = {}

    def before(module: nn.Module, _inputs: Any) -> None:
        starts[id(module)] = counter.get_total_flops()

    def after(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal hooked
        start = starts.pop(id(module), None)
        if start is None:
            return
        seen = counter.get_total_flops() - start
        if _is_recurrent(module):  # its formula replaces the part of it the FLOP counter saw
            hooked += 2 * _recurrent_macs(module, output) - seen
        elif seen == 0:  # the FLOP counter saw none of it
            hooked += 2 * _layer_macs(module, inputs, output)

    handles = []
    for layer in _outermost_layers(model):
        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    try:
        with grad_mode(), counter:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return (counter.get_total_flops() + hooked) // 2


def _outermost_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if _is_layer(m)]
    # A quantized Linear wraps a packed-params child; count each layer once, at its outermost module.
    inner = {id(sub) for m in layers for sub in m.modules() if sub is not m}
    return [m for m in layers if id(m) not in inner]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, LinearShaped)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, ConvShaped)


def _is_recurrent(module: nn.Module) -> bool:
    # torch's float layers and cells (nn.RNNBase, nn.RNNCellBase) and torch.ao's dynamic ones, under
    # whatever torch path they live; a user's module with the same attributes keeps being counted op by op.
    bases = [cls for cls in type(module).__mro__ if cls.__module__.startswith("torch.")]
    return any(cls.__name__ in ("RNNBase", "RNNCellBase") for cls in bases) and _gates(module) > 0


def _is_layer(module: nn.Module) -> bool:
    return _is_linear(module) or _is_conv(module) or _is_recurrent(module)


def _gates(module: nn.Module) -> int:
    """4 for an LSTM (cell), 3 for a GRU, 1 for a plain RNN, 0 for anything else."""
    mode = getattr(module, "mode", None)
    if isinstance(mode, str):
        return _GATES.get(mode, 0)
    # A cell has no mode: its input weight holds one block of rows per gate (torch.ao's packs it).
    weight = getattr(module, "weight_ih", None)
    if weight is None and isinstance(module, PackedRecurrent):
        weights = module.get_weight()
        weight = weights.get("weight_ih") if isinstance(weights, dict) else None
    return int(weight.shape[0]) // _attr(module, "hidden_size") if isinstance(weight, torch.Tensor) else 0


def _recurrent_macs(module: nn.Module, output: Any) -> int:
    """Per time step, layer and direction: gates x hidden x (layer input + hidden state) [+ hidden x proj_size].

    A cell is one layer, one direction, one step per call."""
    hidden, proj = _attr(module, "hidden_size"), int(getattr(module, "proj_size", 0) or 0)
    state = proj or hidden  # an LSTM with proj_size feeds back (and outputs) the projected state
    gates, directions = _gates(module), 2 if getattr(module, "bidirectional", False) else 1
    width = _attr(module, "input_size")
    per_step = 0
    for _ in range(int(getattr(module, "num_layers", 1))):
        per_step += directions * (gates * hidden * (width + state) + hidden * proj)
        width = state * directions
    return _steps(output, state * directions) * per_step


def _steps(output: Any, width: int) -> int:
    """Time steps times sequences the layer ran (one per sequence for a cell): its output's elements over
    the output's ``width``, the last layer's state times its directions."""
    out = output[0] if isinstance(output, tuple) else output  # a layer's (output, state), an LSTM cell's (h, c)
    data = getattr(out, "data", out)  # a PackedSequence holds its steps of all sequences in .data
    return data.numel() // width if isinstance(data, torch.Tensor) else 0


def _layer_macs(module: nn.Module, inputs: Any, output: Any) -> int:
    if not isinstance(output, torch.Tensor):
        return 0
    if _is_linear(module):
        return output.numel() * _attr(module, "in_features")
    if _is_conv(module):
        size: Any = getattr(module, "kernel_size")  # noqa: B009 (typed as Any: nn.Module's getattr says Tensor)
        kernel = math.prod(size) if isinstance(size, tuple) else int(size)
        if getattr(module, "transposed", False):
            return _transposed_macs(module, inputs, kernel)
        return output.numel() * (_attr(module, "in_channels") // _attr(module, "groups")) * kernel
    return 0


def _transposed_macs(module: nn.Module, inputs: Any, kernel: int) -> int:
    """A transposed convolution scatters each input element into ``out_channels / groups`` x kernel
    outputs: counted from its input, as torch's FLOP counter counts the float layer (its output elements
    x ``in_channels`` would overcount by the stride's product: a U-Net's int8 model 1.18x its float one)."""
    first = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
    if not isinstance(first, torch.Tensor):
        return 0
    return first.numel() * (_attr(module, "out_channels") // _attr(module, "groups")) * kernel


def _attr(module: nn.Module, name: str) -> int:
    value: Any = getattr(module, name)
    return int(value)


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
