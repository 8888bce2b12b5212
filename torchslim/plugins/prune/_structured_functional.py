"""Layers whose weight the model uses through a functional call instead of the layer's own forward.

Some attention modules compute their query, key and value with ``F.linear(x, self.qkv.weight, bias=torch.cat(
(self.q_bias, self.k_bias, self.v_bias)))``: the ``qkv`` Linear layer is never called, so no forward hook sees it,
Torch-Pruning's graph has no node for it (the product is an element-wise operation there, its input and output
widths wrongly coupled) and no head group is rooted at it. While the graph is traced and the heads are found,
:func:`routed` makes every ``linear`` / ``conv*`` call whose weight is a Linear or Conv layer's own weight, made
outside that layer's forward, look like a call of the layer: the layer's forward hooks (Torch-Pruning's, the head
finder's) run around it, with its input and output. A bias that is not the layer's own is detached there (it would
otherwise couple the layer's input channels with the tensors it is built from) and recorded as the tensors it is
built from, piece by piece along its rows (a model's parameter or buffer, or a concatenation of them along their
only axis; a piece built on the fly, as ``torch.zeros_like(self.v_bias)``, follows the others by itself). When the
layer's output channels are cut, :func:`cut_pieces` cuts the same rows from those tensors. No name or class is
looked at.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._structured_layers import keep

_CALLS = {"linear", "conv1d", "conv2d", "conv3d"}
"""The functional forms of the layers Torch-Pruning roots groups at."""
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Piece:
    """Rows ``start .. start + size - 1`` of a functional call's bias: a tensor of the model (``owner``'s ``key``),
    or one the forward builds on the fly (``owner`` None: nothing to cut)."""

    owner: nn.Module | None
    key: str
    start: int
    size: int
    tensor: torch.Tensor | None
    """The owner's tensor as recorded: a piece whose tensor was since replaced or resized is not cut again."""


PIECES: weakref.WeakKeyDictionary[nn.Module, tuple[Piece, ...]] = weakref.WeakKeyDictionary()
"""By layer: the pieces of the bias its functional call adds, as the last :func:`routed` trace recorded them."""


@contextmanager
def routed(model: nn.Module) -> Iterator[None]:
    """While active, a functional call with a layer's weight outside that layer's forward runs the layer's forward
    hooks, its bias detached and recorded in :data:`PIECES`."""
    layers = {id(m.weight): m for m in model.modules() if isinstance(m, _LAYERS) and isinstance(m.weight, torch.Tensor)}
    owned = {
        id(t): (module, key)
        for module in model.modules()
        for key, t in [*module._parameters.items(), *module._buffers.items()]
        if t is not None
    }
    route = _Route(layers, owned)
    for layer in layers.values():
        PIECES.pop(layer, None)
    handles = [
        h for m in layers.values() for h in (m.register_forward_pre_hook(route.enter), m.register_forward_hook(route.leave))
    ]
    route.own = {h.id for h in handles}
    try:
        with route:
            yield
    finally:
        for handle in handles:
            handle.remove()


class _Route(TorchFunctionMode):
    """Runs a layer's forward hooks around a functional call of its weight; records concatenations of model tensors."""

    def __init__(self, layers: Mapping[int, nn.Module], owned: Mapping[int, tuple[nn.Module, str]]) -> None:
        super().__init__()
        self.layers, self.owned = layers, owned
        self.inside: list[nn.Module] = []
        """Layers whose own forward is running (their functional call is their own)."""
        self.own: set[int] = set()
        """Ids of this route's own hooks: not run again around a routed call."""
        self.concats: dict[int, tuple[torch.Tensor, tuple[Piece, ...]]] = {}

    def enter(self, module: nn.Module, args: Any) -> None:
        self.inside.append(module)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.inside and self.inside[-1] is module:
            self.inside.pop()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _CALLS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.layers.get(id(weight))
            if layer is not None and layer.weight is weight and layer not in self.inside:
                return self._call(func, layer, list(args), kwargs)
        result = func(*args, **kwargs)
        if name == "cat" and isinstance(result, torch.Tensor) and result.dim() == 1:
            pieces = self._pieces(args[0] if args else kwargs.get("tensors", ()))
            if pieces is not None:
                self.concats[id(result)] = (result, pieces)
        return result

    def _call(self, func: Any, layer: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The functional call, as a call of ``layer``: its forward hooks run with its input and this output."""
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if isinstance(bias, torch.Tensor) and bias is not getattr(layer, "bias", None):
            PIECES[layer] = self._bias(bias)
            if len(args) > 2:
                args[2] = bias.detach()
            else:
                kwargs["bias"] = bias.detach()
        inputs = (args[0] if args else kwargs.get("input"),)
        for key, hook in list(layer._forward_pre_hooks.items()):
            if key not in self.own:
                hook(layer, inputs)
        output = func(*args, **kwargs)
        for key, hook in list(layer._forward_hooks.items()):
            if key not in self.own:
                hook(layer, inputs, output)
        return output

    def _bias(self, bias: torch.Tensor) -> tuple[Piece, ...]:
        """The pieces ``bias`` is built from: itself, if it is a tensor of the model; a recorded concatenation's."""
        concat = self.concats.get(id(bias))
        if concat is not None and concat[0] is bias:
            return concat[1]
        return self._pieces([bias]) or ()

    def _pieces(self, tensors: Sequence[Any]) -> tuple[Piece, ...] | None:
        """One piece per 1-D tensor of ``tensors`` (None if any is not 1-D or none is the model's)."""
        pieces, start = [], 0
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
                return None
            owner, key = self.owned.get(id(tensor), (None, ""))
            if owner is not None and _tensor(owner, key) is not tensor:
                owner, key = None, ""
            pieces.append(Piece(owner, key, start, len(tensor), tensor if owner is not None else None))
            start += len(tensor)
        return tuple(pieces) if any(p.owner is not None for p in pieces) else None


def cut_pieces(layer: Any, removed: Sequence[int], twin: Mapping[nn.Module, nn.Module] | None = None) -> None:
    """Cut output channels ``removed`` of ``layer`` (before its cut, by their old indices) from the tensors its
    functional call's bias is built from, where they are still as recorded (in ``twin``, a copy of the model
    mapped from its modules, the copy's tensors of the recorded sizes)."""
    pieces = _present(layer, twin)
    if pieces is None:
        return
    gone = {int(i) for i in removed}
    for piece, owner in pieces:
        kept = [j for j in range(piece.size) if piece.start + j not in gone]
        if len(kept) < piece.size:
            keep(owner, piece.key, 0, torch.tensor(kept, dtype=torch.long))


def set_rows(layer: Any, values: torch.Tensor, twin: Mapping[nn.Module, nn.Module]) -> bool:
    """Give the tensors the functional call of ``layer`` builds its bias from (in ``twin``, a copy of the model)
    the rows of ``values`` they add; False where the bias has a piece the forward builds on the fly, or none."""
    pieces = _present(layer, twin)
    if not pieces or len(pieces) != len(PIECES[layer]):
        return False
    for piece, owner in pieces:
        tensor = _tensor(owner, piece.key)
        assert tensor is not None  # _present checked it
        tensor.data.copy_(values[piece.start : piece.start + piece.size])
    return True


def _present(layer: Any, twin: Mapping[nn.Module, nn.Module] | None) -> list[tuple[Piece, nn.Module]] | None:
    """The recorded pieces of ``layer``'s bias that are the model's tensors, each with its owner (in ``twin``
    where given), if all of them are still as recorded; else None."""
    found = []
    for piece in PIECES.get(layer, ()):
        if piece.owner is None:
            continue
        owner = piece.owner if twin is None else twin.get(piece.owner)
        tensor = None if owner is None else _tensor(owner, piece.key)
        if (
            owner is None
            or tensor is None
            or tuple(tensor.shape) != (piece.size,)
            or (twin is None and tensor is not piece.tensor)
        ):
            return None
        found.append((piece, owner))
    return found or None


def _tensor(owner: nn.Module, key: str) -> torch.Tensor | None:
    return owner._parameters.get(key) if key in owner._parameters else owner._buffers.get(key)


def pending(graph: Any, plan: Any) -> list[tuple[nn.Module, list[int]]]:
    """The layers of Torch-Pruning's ``plan`` losing output channels whose functional call adds a recorded bias,
    with the channels (to :func:`cut_pieces` after the plan is cut)."""
    return [
        (dep.target.module, [int(i) for i in idxs])
        for dep, idxs in plan
        if dep.target.module in PIECES and graph.is_out_channel_pruning_fn(dep.handler)
    ]
