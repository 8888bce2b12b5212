"""Channel splits a model makes with sizes of its own (``torch.split(x, [self.a, self.b], dim=1)``, as a partial
convolution over a slice of the channels does), pruned consistently.

Two repairs, neither tied to an architecture:

- **The order of a split's pieces.** Torch-Pruning numbers a split's outputs in the order its trace met their
  consumers, not in the order of the pieces, so the indices of the first piece can be mapped into the second
  (a convolution over the first quarter of the channels is given the indices of the other three quarters).
  Autograd records which piece each consumer read (the output number in the consumer's ``next_functions``);
  :func:`order_splits` sorts the outputs by it. From a concatenation back into a split feeding it, Torch-Pruning
  also composes the two index mappings in the wrong order (:func:`order_mappings`).
- **The sizes the forward asks for.** After a cut, the pieces are smaller, but the model's forward still
  splits by the sizes it keeps as attributes. :func:`watch` records, while the graph is traced, which module
  made each split and with which sizes; after a cut, :func:`resize` sets the owner's list of the sizes
  (``self.splits = [a, b]``) to the new sizes, and its integer attributes equal to a piece's old size to its
  new size (those left alone where two pieces of the same old size would need different new sizes: the
  forward check after the cut then undoes it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._structured_trace import repair_concats

_SPLITS = {"split", "split_with_sizes"}


@dataclass(frozen=True)
class Split:
    """A split the forward made with explicit sizes along the channel axis."""

    owner: nn.Module
    sizes: tuple[int, ...]


_RECORDED: weakref.WeakKeyDictionary[Any, dict[Any, Split]] = weakref.WeakKeyDictionary()
"""By dependency graph: its split nodes' owners and sizes (weak: a graph is dropped after its pass)."""


class _Watch(TorchFunctionMode):
    """Records the channel splits made with a list of sizes, by the autograd node of their first piece."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[nn.Module] = []
        self.found: dict[Any, Split] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _SPLITS and self.running and isinstance(result, (tuple, list)):
            sizes = args[1] if len(args) > 1 else (kwargs or {}).get("split_size_or_sections", (kwargs or {}).get("split_sizes"))
            dim = args[2] if len(args) > 2 else (kwargs or {}).get("dim", 0)
            first = result[0] if result else None
            if isinstance(sizes, (list, tuple)) and dim in (1, -3) and isinstance(first, torch.Tensor) and first.grad_fn:
                self.found[first.grad_fn] = Split(self.running[-1], tuple(int(s) for s in sizes))
        return result


@contextmanager
def watch(model: nn.Module) -> Iterator[dict[Any, Split]]:
    """While the graph is traced: the splits with sizes, by the autograd node Torch-Pruning keys its nodes by."""
    spy = _Watch()

    def enter(module: nn.Module, args: Any) -> None:
        spy.running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if spy.running and spy.running[-1] is module:
            spy.running.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with spy:
            yield spy.found
    finally:
        for handle in handles:
            handle.remove()


def adopt(graph: Any, found: dict[Any, Split]) -> None:
    """Keep, for ``graph``, the owner and sizes of each of its split nodes that :func:`watch` saw made."""
    import torch_pruning as tp

    _RECORDED[graph] = {
        node: found[node.grad_fn]
        for node in graph.module2node.values()
        if node.type == tp.ops.OPTYPE.SPLIT and node.grad_fn in found
    }


def remembered(graph: Any) -> dict[Any, Split]:
    """A copy of what ``graph``'s split nodes hold now (owners and sizes), for :func:`recall` after cuts are undone."""
    return dict(_RECORDED.get(graph, {}))


def recall(graph: Any, recorded: dict[Any, Split]) -> None:
    """Put back what :func:`remembered` returned."""
    if graph in _RECORDED:
        _RECORDED[graph] = dict(recorded)


def order_splits(graph: Any) -> int:
    """Sort every split node's outputs by the piece each reads (from autograd); returns how many were reordered."""
    import torch_pruning as tp

    reordered = 0
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT or len(node.outputs) < 2:
            continue
        pieces = [_piece(node, out) for out in node.outputs]
        numbers = [p for p in pieces if p is not None]
        if len(numbers) == len(pieces) and sorted(set(numbers)) != sorted(numbers) and node.module.offsets:
            map_by_piece(node, numbers)  # a piece read by several consumers: mapped by the piece each reads
            reordered += 1
            continue
        if len(numbers) != len(pieces) or sorted(numbers) != list(range(len(numbers))) or numbers == sorted(numbers):
            continue  # a piece not read (the order cannot be told), or in order already
        node.outputs = [out for _, out in sorted(zip(numbers, node.outputs, strict=True), key=lambda pair: pair[0])]
        for out in node.outputs:
            if out.type == tp.ops.OPTYPE.CONCAT:
                out.module.concat_sizes = None  # inferred from the pieces in the wrong order: as autograd recorded
        reordered += 1
    if reordered:
        repair_concats(graph)
    return reordered


class _ConcatFirst(list):  # type: ignore[type-arg]
    """A dependency's two index mappings, applied last first: from a concatenation back into a split that feeds
    it, the concatenation's piece is found first, then its place in the split's input."""

    def __iter__(self) -> Iterator[Any]:
        items: list[Any] = [list.__getitem__(self, i) for i in range(len(self))]
        return iter(items[::-1])


def order_mappings(graph: Any) -> int:
    """Torch-Pruning applies a dependency's split mapping before its concatenation mapping; from a concatenation
    back into a split (a piece passed through untouched) the order must be the reverse, or indices are mapped
    by the split's offsets where the concatenation's differ (as they do once a piece was cut). Returns how many
    dependencies were set right."""
    import torch_pruning as tp

    fixed = 0
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.CONCAT:
            continue
        for dep in node.dependencies:
            if dep.target.type == tp.ops.OPTYPE.SPLIT and not isinstance(dep.index_mapping, _ConcatFirst):
                dep.index_mapping = _ConcatFirst(dep.index_mapping)
                fixed += 1
    return fixed


def map_by_piece(node: Any, pieces: list[int]) -> None:
    """Map a split's indices to each consumer by the piece it reads (Torch-Pruning maps its ``i``-th consumer to
    the ``i``-th piece, and fails where a piece has two consumers); the node is then no longer updated as a split
    by Torch-Pruning, and :func:`resize` maps it again after a cut."""
    import torch_pruning as tp
    from torch_pruning.dependency.index_mapping import _SplitIndexMapping

    offsets = list(node.module.offsets)
    for out, piece in zip(node.outputs, pieces, strict=True):
        for dep in node.dependencies:
            if dep.target is out:
                dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[piece : piece + 2], reverse=False)
        for dep in out.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[piece : piece + 2], reverse=True)
    node.module.pieces = pieces
    node.type = tp.ops.OPTYPE.ELEMENTWISE


def _piece(split: Any, consumer: Any) -> int | None:
    """Which output of ``split`` the ``consumer`` node reads, from its autograd inputs (None where not one)."""
    grad_fn = getattr(consumer, "grad_fn", None)
    numbers = {nr for fn, nr in getattr(grad_fn, "next_functions", ()) if fn is split.grad_fn}
    return numbers.pop() if len(numbers) == 1 else None


Pending = list[tuple[Any, tuple[int, ...], Split | None]]
"""What a cut is about to shrink: (a split or concatenation node, its pieces' sizes after the cut, the split's
owner and old sizes where the forward asked for them)."""


def pending(graph: Any, plan: Any) -> Pending:
    """Before ``plan`` is cut: each split and concatenation it cuts, with the sizes its pieces will have (Torch-
    Pruning's own update of them miscounts where a plan cuts a concatenation through several paths)."""
    recorded = _RECORDED.get(graph, {})
    found = []
    for dep, idxs in plan:
        node = dep.target
        sizes = getattr(node.module, "concat_sizes", None) or getattr(node.module, "split_sizes", None)
        if not sizes or None in sizes:
            continue
        gone = {int(i) for i in idxs}
        start, after = 0, []
        for size in sizes:
            after.append(size - sum(1 for i in range(start, start + size) if i in gone))
            start += size
        found.append((node, tuple(after), recorded.get(node)))
    return found


def resize(graph: Any, cuts: Pending) -> None:
    """After the cut: the nodes' sizes, and the split owners' size attributes, take the pieces' new sizes."""
    for node, sizes, split in cuts:
        key = "concat_sizes" if getattr(node.module, "concat_sizes", None) is not None else "split_sizes"
        setattr(node.module, key, list(sizes))
        node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        if getattr(node.module, "pieces", None) is not None:
            map_by_piece(node, node.module.pieces)
        if split is not None:
            _resize_owner(split, sizes)
            _RECORDED[graph][node] = Split(split.owner, sizes)


def _resize_owner(split: Split, sizes: tuple[int, ...]) -> None:
    """The owner's list or tuple attribute holding the old sizes, in order, takes the new ones; its integer
    attributes equal to a piece's old size take its new size (none where two pieces of one old size were cut
    differently: no integer can say both, though a list of the sizes still can)."""
    owner: Any = split.owner
    for key, value in list(vars(owner).items()):
        if type(value) in (list, tuple) and not key.startswith("_") and _same_sizes(value, split.sizes):
            setattr(owner, key, type(value)(sizes))
    changes: dict[int, int] = {}
    if any(changes.setdefault(old, new) != new for old, new in zip(split.sizes, sizes, strict=True)):
        return
    for key, value in list(vars(owner).items()):
        if type(value) is int and not key.startswith("_") and value in changes:
            setattr(owner, key, changes[value])


def _same_sizes(value: list[Any] | tuple[Any, ...], sizes: tuple[int, ...]) -> bool:
    """Whether ``value`` is the sizes a split was made with (integers, in the same order)."""
    return len(value) == len(sizes) and all(type(v) is int and v == s for v, s in zip(value, sizes, strict=True))
