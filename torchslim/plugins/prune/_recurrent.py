"""Structured pruning of torch's recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): whole hidden units.

A hidden unit is one row of every gate's input and hidden weights (and biases), one column of the hidden
weights (the state fed back), and one column of the next layer's input weights. Torch-Pruning 1.6's LSTM
pruner handles one layer only and slices the wrong dimensions, and it knows no GRU or RNN, so this module
gives the dependency graph a pruner of its own for these layers (:func:`recurrent_pruners`).

To the graph a recurrent layer is one node whose output channels are its last layer's units (both
directions: ``[forward | backward]``, ``hidden_size`` each). A bidirectional layer keeps one
``hidden_size`` for both directions, so its units go in pairs (unit ``j`` of each direction:
``get_out_channel_groups`` is 2). The layers below the last (``num_layers`` > 1) are invisible to the graph
and share that ``hidden_size``: each loses as many units as the last, its least important ones, ranked by the
weights of the layer above that read them. A layer read only by other recurrent layers (which Torch-Pruning's
importance does not score) is ranked the same way (:func:`reader_importance`). An LSTM with ``proj_size`` is
not pruned (its output is the projection; :func:`refused` says so, and the group is left whole).

Measured before writing this (LSTM and GRU classifiers: embedding 64, hidden 256, 2 layers, sequence 64,
batch 16; hidden 179 against 256; torch 2.13 on 2 shared cores, load 3.3): float LSTM 1.88x faster at 1 thread,
1.80x at 2; dynamic int8 LSTM 1.40x / 1.39x; float GRU 1.14x / 1.75x; int8 GRU 1.10x / 1.05x (docs/prune.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: The recurrent layer types whose hidden units are pruned (their cells run in user loops the graph cannot follow).
RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)
#: Gates of each ``mode``: blocks of ``hidden_size`` rows in the input and hidden weights.
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@contextmanager
def recurrent_tracing(model: nn.Module) -> Iterator[dict[type[nn.Module], Any]]:
    """While tracing the dependency graph: Torch-Pruning's customized pruners for the recurrent layer types in
    ``model`` (empty if none), and each recurrent layer seen by autograd as one node.

    On the CPU an LSTM runs one fused kernel, one autograd node with the input and weights behind it; a GRU or
    RNN runs step by step, and Torch-Pruning would follow its gates' slices and concatenations as channel
    operations of the graph (and fail mapping their indices). :class:`_OneNode` makes every one of them look
    like the LSTM's fused kernel, only while the graph is traced.
    """
    layers = [m for m in model.modules() if isinstance(m, RECURRENT_TYPES)]
    for layer in layers:
        layer.forward = _one_node_forward(layer)  # an instance attribute: the class's forward stays as it was
    try:
        yield {type(m): _pruner() for m in layers}
    finally:
        for layer in layers:
            del layer.forward


def _one_node_forward(layer: nn.Module) -> Any:
    forward = type(layer).forward

    def one_node(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(inputs, torch.Tensor) or args or kwargs:  # a packed sequence, a given state
            return forward(layer, inputs, *args, **kwargs)
        with torch.no_grad():
            output, state = forward(layer, inputs)
        states = tuple(state) if isinstance(state, tuple) else (state,)
        flat = _OneNode.apply(inputs, output, *states, *layer.parameters())
        return flat[0], (tuple(flat[1:]) if isinstance(state, tuple) else flat[1])

    return one_node


class _OneNode(torch.autograd.Function):
    """The layer's outputs (computed already) behind one autograd node whose inputs are the layer's input
    and weights: what Torch-Pruning's graph reads of a fused recurrent kernel. Never differentiated."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, output: torch.Tensor, *rest: torch.Tensor) -> Any:
        count = len(rest) - sum(1 for t in rest if isinstance(t, nn.Parameter))
        return (output.clone(), *(t.clone() for t in rest[:count]))

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("a recurrent layer traced for its dependency graph is not differentiated")


def recurrent_width(module: nn.Module) -> int:
    """Output channels of a recurrent layer (its last layer's units, both directions), 0 for any other module."""
    if not isinstance(module, nn.RNNBase) or not isinstance(module, RECURRENT_TYPES):
        return 0
    return int(module.proj_size or module.hidden_size) * _directions(module)


def refused(layer: nn.Module) -> str | None:
    """Why the hidden units of ``layer`` are not pruned (an LSTM with ``proj_size``), or None."""
    if not isinstance(layer, nn.LSTM) or not layer.proj_size:
        return None
    return (
        f"an LSTM with proj_size={layer.proj_size} outputs its projection, which torchslim does not cut; its "
        f"{layer.hidden_size} hidden units and its output are kept whole (the layers feeding it are pruned, and it "
        "loses their input columns). To prune its units, build it without proj_size (a Linear after it does the "
        "projection and is pruned like any Linear)"
    )


def reader_importance(graph: Any, group: Any, norm: int) -> torch.Tensor | None:
    """Importance of a recurrent layer's output channels that only recurrent layers read (Torch-Pruning's
    importance scores no recurrent layer): the ``norm`` of the input-weight columns that read each, over both
    directions, summed over the readers; None if no recurrent layer reads them."""
    root = group[0].dep.target.module
    scores, found = torch.zeros(recurrent_width(root)), False
    for item in group:
        layer = item.dep.target.module
        if not isinstance(layer, nn.RNNBase) or not graph.is_in_channel_pruning_fn(item.dep.handler):
            continue
        columns = [getattr(layer, f"weight_ih_l0{suffix}")[:, item.idxs] for suffix in _suffixes(layer)]
        local = sum(w.detach().float().abs().pow(norm).sum(0) for w in columns)
        scores.scatter_add_(0, torch.tensor(item.root_idxs, dtype=torch.long), torch.as_tensor(local))
        found = True
    return scores if found else None


def _directions(layer: nn.RNNBase) -> int:
    return 2 if layer.bidirectional else 1


def _pruner() -> Any:
    import torch_pruning as tp

    class RecurrentPruner(tp.pruner.function.BasePruningFunc):  # type: ignore[misc]
        """Hidden units out, input features in (the first layer's input columns)."""

        TARGET_MODULES = RECURRENT_TYPES
        CUTS_ALL_TENSORS = True  # every gate's rows and columns: no tensor is left for the leftovers rule

        def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
            prune_units(layer, [int(i) for i in idxs])
            return layer

        def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
            gone = {int(i) for i in idxs}
            keep = torch.tensor([i for i in range(layer.input_size) if i not in gone])
            for suffix in _suffixes(layer):
                _slice(layer, f"weight_ih_l0{suffix}", columns=keep)
            layer.input_size = len(keep)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return recurrent_width(layer)

        def get_in_channels(self, layer: nn.RNNBase) -> int:
            return int(layer.input_size)

        def get_out_channel_groups(self, layer: nn.RNNBase) -> int:
            return _directions(layer)

    return RecurrentPruner()


def prune_units(layer: nn.RNNBase, channels: list[int]) -> None:
    """Remove the hidden units behind output ``channels`` (``[forward | backward]`` of the last layer) from
    every layer of ``layer``: the same count from each direction and each layer below."""
    if layer.proj_size:
        raise ValueError("an LSTM with proj_size outputs its projection: its hidden units are not pruned")
    hidden, directions = int(layer.hidden_size), _directions(layer)
    last = [sorted({c - d * hidden for c in channels if d * hidden <= c < (d + 1) * hidden}) for d in range(directions)]
    if len({len(gone) for gone in last}) != 1:
        raise ValueError("a bidirectional layer must lose as many units in each direction")
    count = len(last[0])
    kept: list[list[torch.Tensor]] = []
    for index in range(layer.num_layers):
        gone = last if index == layer.num_layers - 1 else [_weakest(layer, index, d, count) for d in range(directions)]
        kept.append([torch.tensor([j for j in range(hidden) if j not in set(g)]) for g in gone])
    for index, units in enumerate(kept):
        inputs = None if index == 0 else torch.cat([u + d * hidden for d, u in enumerate(kept[index - 1])])
        for d, suffix in enumerate(_suffixes(layer)):
            _cut_layer(layer, f"l{index}{suffix}", units[d], inputs, _GATES[layer.mode], hidden)
    layer.hidden_size = hidden - count


def _weakest(layer: nn.RNNBase, index: int, direction: int, count: int) -> list[int]:
    """The ``count`` units of layer ``index``'s ``direction`` whose columns in the next layer's input
    weights (both its directions) have the smallest L2 norm."""
    hidden = int(layer.hidden_size)
    columns = slice(direction * hidden, (direction + 1) * hidden)
    reading = [getattr(layer, f"weight_ih_l{index + 1}{suffix}")[:, columns] for suffix in _suffixes(layer)]
    norms = torch.stack([w.detach().float().pow(2).sum(0) for w in reading]).sum(0)
    return sorted(torch.argsort(norms)[:count].tolist())


def _cut_layer(layer: nn.Module, name: str, units: torch.Tensor, inputs: torch.Tensor | None, gates: int, hidden: int) -> None:
    """Keep ``units`` in one layer-direction's gate rows and hidden columns, and ``inputs`` of its input columns."""
    rows = torch.cat([units + g * hidden for g in range(gates)])
    _slice(layer, f"weight_ih_{name}", rows=rows, columns=inputs)
    _slice(layer, f"weight_hh_{name}", rows=rows, columns=units)
    for bias in (f"bias_ih_{name}", f"bias_hh_{name}"):
        if getattr(layer, bias, None) is not None:
            _slice(layer, bias, rows=rows)


def _slice(layer: nn.Module, name: str, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
    # nn.RNNBase.__setattr__ keeps its flat weight list in step with the new parameter.
    value = getattr(layer, name).data
    if rows is not None:
        value = value[rows]
    if columns is not None:
        value = value[:, columns]
    setattr(layer, name, nn.Parameter(value.clone(), requires_grad=getattr(layer, name).requires_grad))


def _suffixes(layer: nn.RNNBase) -> list[str]:
    return ["", "_reverse"][: _directions(layer)]
