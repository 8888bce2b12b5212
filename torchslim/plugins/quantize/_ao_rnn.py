"""torch.ao's dynamically quantized recurrent layers (LSTM, GRU and the cells), saved as plain tensors.

torch keeps their packed weights as TorchScript objects (``CellParamsBase``, ``LinearPackedParamsBase``)
and puts those objects in the state dict as they are. ``torch.load(..., weights_only=True)`` refuses
them (it loads tensors and plain Python values only), so a model holding such a layer could be saved
but never loaded again. The classes here are the same layers with a state dict of plain tensors: the
int8 (or float16) weights and float biases the packed objects hold, packed again when loaded. Forward,
kernels and names are torch's; :func:`savable` swaps the classes in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as dq
from torch.ao.nn.quantized.dynamic.modules.rnn import PackedParameter

#: The serialization tag torch gives int8 cell weights (``CellParamsBase.__getstate__``), and float16 ones.
INT8_CELL = "quantized_dynamic"
FP16_CELL = "quantized_fp16"


def plain_linear(packed: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(weight, bias)`` a packed Linear weight holds: an int8 quantized tensor, or float16 (the
    precision a float16 pack keeps; torch hands it back as float32)."""
    (weight, bias), _ = packed.__getstate__()
    if not weight.is_quantized:
        weight = weight.half()
    return weight, None if bias is None else bias.detach()


def packed_linear(plain: tuple[torch.Tensor, torch.Tensor | None]) -> Any:
    """The packed Linear weight of a :func:`plain_linear` pair, on torch's current quantized engine."""
    weight, bias = plain
    if weight.is_quantized:
        return torch.ops.quantized.linear_prepack(weight, bias)
    return torch.ops.quantized.linear_prepack_fp16(weight.float(), bias)


def plain_cell(params: Any) -> dict[str, Any]:
    """The plain tensors of one layer-direction's packed LSTM/GRU weights (a ``CellParamsBase``)."""
    kind, biases, _doubles, longs, packed = params.__getstate__()[0]
    state: dict[str, Any] = {"kind": kind, "ih": plain_linear(packed[0]), "hh": plain_linear(packed[1])}
    if kind == INT8_CELL:
        # The int8 cell keeps its float biases apart from the packs, and a reduce_range flag.
        state.update(bias_ih=biases[0].detach(), bias_hh=biases[1].detach(), reduce_range=bool(longs[0]))
    return state


def packed_cell(state: Mapping[str, Any]) -> Any:
    """The ``CellParamsBase`` of a :func:`plain_cell` state."""
    ih, hh = packed_linear(state["ih"]), packed_linear(state["hh"])
    if state["kind"] == FP16_CELL:
        return torch.ops.quantized.make_quantized_cell_params_fp16(ih, hh)
    return torch.ops.quantized.make_quantized_cell_params_dynamic(
        ih, hh, state["bias_ih"], state["bias_hh"], state["reduce_range"]
    )


class PlainPackedParameter(PackedParameter):
    """One layer-direction's weights of a dynamic LSTM/GRU, in the state dict as plain tensors."""

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "param"] = plain_cell(self.param)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        value = state_dict.get(prefix + "param")
        if value is None:
            missing_keys.append(prefix + "param")
        elif isinstance(value, Mapping):
            self.param = packed_cell(value)
        else:  # torch's own packed object, from a state dict taken before the swap
            self.param = value


class _PlainCellWeights(nn.Module):
    """A dynamic RNN/LSTM/GRU cell whose two packed weights go to the state dict as plain tensors."""

    _packed_weight_ih: Any
    _packed_weight_hh: Any

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("_packed_weight_ih", "_packed_weight_hh"):
            destination[prefix + name] = plain_linear(getattr(self, name))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("_packed_weight_ih", "_packed_weight_hh"):
            value = state_dict.get(prefix + name)
            if isinstance(value, (tuple, list)):
                state_dict[prefix + name] = packed_linear((value[0], value[1]))
        super()._load_from_state_dict(state_dict, prefix, *args)


class PlainLSTMCell(_PlainCellWeights, dq.LSTMCell):
    """torch's dynamic LSTMCell, saved as plain tensors."""


class PlainGRUCell(_PlainCellWeights, dq.GRUCell):
    """torch's dynamic GRUCell, saved as plain tensors."""


class PlainRNNCell(_PlainCellWeights, dq.RNNCell):
    """torch's dynamic RNNCell, saved as plain tensors."""


_PLAIN: dict[type[nn.Module], type[nn.Module]] = {
    PackedParameter: PlainPackedParameter,
    dq.LSTMCell: PlainLSTMCell,
    dq.GRUCell: PlainGRUCell,
    dq.RNNCell: PlainRNNCell,
}


def savable(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with torch's dynamic recurrent layers' weights saved as plain tensors."""
    for module in model.modules():
        plain = _PLAIN.get(type(module))
        if plain is not None:
            module.__class__ = plain
    return model
