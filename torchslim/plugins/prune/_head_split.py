"""Attention heads found from the graph: which Linear layers' outputs the model splits into heads.

One forward pass is watched (a ``TorchFunctionMode``). A Linear layer's output that is reshaped, viewed or
unflattened so that its last axis becomes ``(..., [k,] H, d)`` with ``k * H * d`` its width is a projection
into ``H`` heads of ``d``: ``k`` is 3 for a fused query-key-value layer, 2 for a fused key-value one, 1 for
a separate projection. An output first chunked or split along its last axis into ``k`` equal parts, each
then split into ``(H, d)``, is the same fused layout. Row ``b * H * d + h * d + j`` belongs to head ``h``.
The module whose forward made the split owns the heads (its head count is updated after a cut). A split
counts only if what it gave reaches an attention product (a matrix product, ``einsum`` or
``scaled_dot_product_attention``) before any other layer: a Linear layer's output reshaped into image patches
is no heads. No name or class of the model is looked at.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_SPLITS = {"reshape", "view", "unflatten"}
"""Functions and tensor methods whose result may put heads on the projection's last axis."""
_PARTS = {"chunk", "split", "tensor_split"}
"""Functions and tensor methods that may cut a fused projection's output into q, k and v first."""
_SAME = {"unsqueeze", "squeeze", "contiguous", "clone", "flatten"}
"""Functions and tensor methods that may give the projection's output another leading shape before its split."""
_PRODUCTS = {"matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention"}
"""Where heads meet: a split reaching one of these is attention."""
_LAYERS = {"linear", "conv1d", "conv2d", "conv3d", "embedding"}
"""Where a split's trail ends without meeting an attention product."""


@dataclass(frozen=True)
class Split:
    """How one Linear layer's output rows are split into heads."""

    owner: nn.Module
    """The module whose forward split them: it holds the head count."""
    count: int
    head_dim: int
    fused: int
    """The blocks of ``count * head_dim`` rows: 3 for query, key and value in one layer, 1 for one of them."""


def find_splits(model: nn.Module, example: torch.Tensor) -> dict[nn.Linear, Split]:
    """The Linear layers of ``model`` whose outputs one forward on ``example`` splits into heads (a layer
    split two different ways is left out; a forward that fails finds none)."""
    watch = _Watch()
    try:
        with torch.no_grad(), _hooks(model, watch), watch:
            model(example)
    except Exception:  # the structured stage reports a failing forward itself; here it means no heads
        return {}
    found = {layer: split for layer, split in watch.found.items() if split is not None and layer in watch.confirmed}
    for layer in found:
        READERS[layer] = tuple(watch.readers.get(layer, ()))
    return found


READERS: weakref.WeakKeyDictionary[nn.Linear, tuple[nn.Linear, ...]] = weakref.WeakKeyDictionary()
"""The Linear layers that read what the last :func:`find_splits` found each projection's heads become (after
the attention product): the layers merging the heads."""


@contextmanager
def _hooks(model: nn.Module, watch: _Watch) -> Iterator[None]:
    """Hooks telling ``watch`` which module runs and which tensors Linear layers produce."""

    def enter(module: nn.Module, args: Any) -> None:
        watch.running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if watch.running and watch.running[-1] is module:
            watch.running.pop()
        if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
            watch.produced[id(output)] = (output, module, 1)

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Watch(TorchFunctionMode):
    """Follows the tensors Linear layers produce into the reshapes that split them into heads."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[nn.Module] = []
        self.produced: dict[int, tuple[torch.Tensor, nn.Linear, int]] = {}
        """id -> (the tensor, kept alive so that its id stays its own; its layer; parts its layer's output was cut into)."""
        self.found: dict[nn.Linear, Split | None] = {}
        self.derived: dict[int, tuple[torch.Tensor, frozenset[nn.Linear]]] = {}
        """id -> (a tensor computed from a split, the layers whose splits it comes from)."""
        self.confirmed: set[nn.Linear] = set()
        """Layers whose split reached an attention product."""
        self.readers: dict[nn.Linear, list[nn.Linear]] = {}
        """Layers whose input came from a layer's split (after its attention product, where it was confirmed)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        source = args[0] if args else None
        seen = self.produced.get(id(source)) if isinstance(source, torch.Tensor) else None
        if seen is not None and seen[0] is source:
            if name in _SPLITS and isinstance(result, torch.Tensor) and self._split(source, result, seen[1], seen[2]):
                self.derived[id(result)] = (result, frozenset([seen[1]]))
            elif name in _PARTS and seen[2] == 1 and isinstance(result, (tuple, list)):
                self._parts(source, result, seen[1])
            elif (
                name in _SAME
                and isinstance(result, torch.Tensor)
                and result.shape[-1:] == source.shape[-1:]
                and result.numel() == source.numel()
            ):
                self.produced[id(result)] = (result, seen[1], seen[2])  # the same rows, another leading shape
            return result
        self._follow(name, [*_tensors(args), *_tensors((kwargs or {}).values())], result)
        return result

    def _follow(self, name: str, inputs: list[torch.Tensor], result: Any) -> None:
        """Carry the splits' layers from ``inputs`` to ``result``; confirm them at an attention product."""
        layers: frozenset[nn.Linear] = frozenset()
        for tensor in inputs:
            entry = self.derived.get(id(tensor))
            if entry is not None and entry[0] is tensor:
                layers |= entry[1]
        if not layers or name in _LAYERS:
            reader = self.running[-1] if self.running else None
            if name == "linear" and isinstance(reader, nn.Linear) and reader not in layers:
                for layer in layers:
                    self.readers.setdefault(layer, []).append(reader)
            return
        if name in _PRODUCTS:
            self.confirmed |= layers  # and followed on, to the layers reading the heads (``readers``)
        for tensor in _tensors([result]):
            self.derived[id(tensor)] = (tensor, layers)

    def _parts(self, source: torch.Tensor, parts: Any, layer: nn.Linear) -> None:
        """Equal parts along the last axis: each is followed as one of ``len(parts)`` fused blocks."""
        widths = {p.shape[-1] if isinstance(p, torch.Tensor) else -1 for p in parts}
        if (
            len(parts) in (2, 3)
            and len(widths) == 1
            and widths.pop() * len(parts) == source.shape[-1]
            and all(p.shape[:-1] == source.shape[:-1] for p in parts)
        ):
            for part in parts:
                self.produced[id(part)] = (part, layer, len(parts))

    def _split(self, source: torch.Tensor, result: torch.Tensor, layer: nn.Linear, parts: int) -> bool:
        """Record ``result`` as ``layer``'s output split into heads, if it is one."""
        trailing = _trailing(source, result)
        if trailing is None:
            return False
        trailing = tuple(size for size in trailing if size != 1)  # an axis of one holds no rows: (H, 1, d) is (H, d)
        if len(trailing) == 2:
            split = (parts, *trailing)
        elif len(trailing) == 3 and parts == 1 and trailing[0] in (2, 3):
            split = trailing
        else:
            return False
        owner = self.running[-1] if self.running else layer
        found = Split(owner, split[1], split[2], split[0])
        self.found[layer] = found if self.found.get(layer, found) == found else None
        return True


def _trailing(source: torch.Tensor, result: torch.Tensor) -> tuple[int, ...] | None:
    """The axes of ``result`` that the last axis of ``source`` became (the others keep their total size)."""
    width, product = source.shape[-1], 1
    for index in range(result.dim() - 1, -1, -1):
        product *= result.shape[index]
        if product == width:
            leading = math.prod(result.shape[:index])
            return tuple(result.shape[index:]) if leading == math.prod(source.shape[:-1]) else None
        if product > width:
            return None
    return None


def _tensors(values: Any) -> list[torch.Tensor]:
    """The tensors among ``values``, one level of lists and tuples opened."""
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found
