"""Attention whose heads are as wide as its input, and tied to it: pruned by head dimensions, with the residual
channels it reads. The one mechanism for this case in the structured prune.

Many attention modules take the head size from their input, ``qkv(x).reshape(B, N, 3, H, C // H)`` with ``C``
from ``x.shape`` (XCiT's cross-covariance attention, VOLO's and CaiT's attention, ConViT's), or merge the heads
back to the input's width, ``reshape(B, N, C)``: cutting whole heads breaks their forward, and so does cutting
the residual channels they read. The candidates are read from the graph (``_head_split``: the projections
into heads, their head count and size, and the Linear layers merging the heads); what the graph cannot tell,
whether the head size comes from the input, is found by trial: a copy of the module with one head cut (its
projections' rows, its output projections' columns, its per-head layers and tensors, its head count) fails
on the input it had in the model's forward. Its heads can then only narrow with its input: when a group of
coupled channels that its projections read loses ``r`` channels, ``r`` a multiple of its head count ``H``
(:func:`fit`), each head loses ``r / H`` dimensions in the same cut -- the same dimensions in every head, in
the query, key and value alike, and the merging layers' columns of the value's, whether the heads are
merged head-major or dimension-major (measured, :func:`_merge_columns`) -- chosen by the norms of those rows
and columns. Its own heads are not cut whole (:func:`tied_heads`). No name or class of the model is looked at.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _structured_functional as functional

if TYPE_CHECKING:
    from ._head_split import Split
    from ._structured import _Group
    from ._structured_data import Removal


@dataclass(frozen=True)
class Tied:
    """An attention module whose heads' width is its input's."""

    owner: nn.Module
    count: int
    head_dim: int
    roots: tuple[tuple[nn.Linear, int], ...]
    """Its projections into heads, each with its blocks of ``count * head_dim`` rows (3 for a fused q/k/v)."""
    merges: tuple[nn.Linear, ...]
    """The Linear layers reading its heads' output (as wide as its heads), as the graph showed them."""
    columns: tuple[int, ...] = ()
    """The merging layers' input column of each head dimension ``h * head_dim + d``, as measured (the heads may
    be merged head-major or dimension-major)."""


@dataclass(frozen=True)
class DimCut:
    """The head dimensions one cut removes from a tied attention module (the same in every head)."""

    tied: Tied
    dims: tuple[int, ...]


_TIED: weakref.WeakKeyDictionary[nn.Module, Tied] = weakref.WeakKeyDictionary()
"""The last :func:`find_tied`'s tied attention modules, by projection into heads."""


def find_tied(model: nn.Module, example: torch.Tensor, splits: dict[nn.Linear, Split]) -> None:
    """Find the attention modules among ``splits``' owners whose heads cannot be cut without their input (trial)."""
    for module in model.modules():
        _TIED.pop(module, None)
    candidates = [c for c in (_candidate(owner, splits) for owner in {s.owner for s in splits.values()}) if c]
    if not candidates:
        return
    with _inputs([c.owner for c in candidates]) as seen, torch.no_grad():
        try:
            model(example)
        except Exception:  # the structured stage reports a failing forward itself
            return
    for tied in candidates:
        if tied.owner not in seen or not _breaks_without_a_head(tied, model, *seen[tied.owner]):
            continue
        columns = _merge_columns(tied, model, *seen[tied.owner])
        if columns is None:
            continue  # where the heads' dimensions land in the merging layers is unknown: left whole
        for layer, _ in tied.roots:
            _TIED[layer] = replace(tied, columns=columns)


def _candidate(owner: nn.Module, splits: dict[nn.Linear, Split]) -> Tied | None:
    """``owner`` as a :class:`Tied` if its projections are its own, split alike, and read as many channels as its
    heads hold; else None."""
    own = {id(m) for m in owner.modules()}
    roots = [(layer, s) for layer, s in splits.items() if s.owner is owner]
    shapes = {(s.count, s.head_dim) for _, s in roots}
    if len(shapes) != 1 or not all(id(layer) in own for layer, _ in roots):
        return None
    count, head_dim = shapes.pop()
    width = count * head_dim
    if head_dim < 2 or any(layer.in_features != width for layer, _ in roots):
        return None
    from ._head_split import READERS

    merges = tuple({id(m): m for layer, _ in roots for m in READERS.get(layer, ()) if m.in_features == width}.values())
    if not merges:
        return None
    return Tied(owner, count, head_dim, tuple((layer, s.fused) for layer, s in roots), merges)


@contextmanager
def _inputs(owners: list[nn.Module]) -> Iterator[dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """The first arguments each of ``owners`` is called with in the forward run inside."""
    seen: dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.setdefault(module, (args, kwargs))

    handles = [owner.register_forward_pre_hook(record, with_kwargs=True) for owner in owners]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _copy(owner: nn.Module, model: nn.Module) -> nn.Module:
    """A deep copy of ``owner`` sharing every module, parameter and buffer of ``model`` outside it.

    Why not ``copy.deepcopy(owner)``: a hook on one of its layers can hold the whole model (the graph's tracing
    routes functional calls through a bound method whose object keeps every layer and tensor), and deepcopy
    copies a bound method's object. One whole-model copy per candidate module: deepseek_vit_412m's structured
    stage ran out of 23 GB, vit_base_patch16_224's held 10x its weights."""
    inside = {id(m) for m in owner.modules()} | {id(t) for t in (*owner.parameters(), *owner.buffers())}
    memo: dict[int, Any] = {id(x): x for x in (*model.modules(), *model.parameters(), *model.buffers()) if id(x) not in inside}
    return copy.deepcopy(owner, memo)


def _breaks_without_a_head(tied: Tied, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a copy of the module with its first head cut fails on ``args``: its heads are tied to its input."""
    from ._structured_heads import Heads, drop_heads

    trial = _copy(tied.owner, model)
    twin: dict[nn.Module, Any] = dict(zip(tied.owner.modules(), trial.modules(), strict=True))
    width, size = tied.count * tied.head_dim, tied.head_dim
    for layer, fused in tied.roots:
        _keep_rows(twin[layer], [i for i in range(fused * width) if i % width >= size])
        functional.cut_pieces(layer, [i for i in range(fused * width) if i % width < size], twin)
    merges = [twin[m] for m in tied.merges if m in twin]  # one outside the module reads its narrower output
    for merge in merges:
        _keep_columns(merge, list(range(size, width)))
    skip = {id(twin[layer]) for layer, _ in tied.roots} | {id(m) for m in merges}
    _cut_first_head_elsewhere(trial, tied.count, tied.head_dim, skip)
    drop_heads(Heads(trial, "", tied.count, size, 1, inputs=width), torch.arange(1, tied.count))
    try:
        with torch.no_grad():
            trial(*args, **kwargs)
    except Exception:  # any failure: the heads are not cut alone
        return True
    return False


def _cut_first_head_elsewhere(trial: nn.Module, count: int, head_dim: int, skip: set[int]) -> None:
    """In the trial copy: per-head Linear layers (a side as wide as the heads' count) and per-head tensors of its
    submodules lose the first head."""
    if count == head_dim:
        return  # a per-head side is not told from a per-dimension one
    kept = list(range(1, count))
    for module in trial.modules():
        if module is trial or id(module) in skip:
            continue
        if isinstance(module, nn.Linear):
            if module.out_features == count:
                _keep_rows(module, kept)
            if module.in_features == count:
                _keep_columns(module, kept)
            continue
        for key, tensor in list(module._parameters.items()):
            if tensor is not None and tensor.is_floating_point() and count in tensor.shape:
                dim = max(i for i, s in enumerate(tensor.shape) if s == count)
                module._parameters[key] = nn.Parameter(tensor.data.index_select(dim, torch.tensor(kept)))


def _merge_columns(tied: Tied, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """Which input column of the merging layers each head dimension reaches, measured on a copy whose projections
    output a constant per row (zero weights, the bias a code): the attention weights then sum to one over equal
    values, and a column reads its value row's code, scaled alike in a run with every code one. Where a column
    mixes a head's dimensions (a head attending over its channels) the rows carry their head's code instead, and
    the heads' order (head-major or dimension-major) is read, the dimensions kept in order; None if unreadable."""
    width, size = tied.count * tied.head_dim, tied.head_dim
    runs = _coded_runs(tied, model, args, kwargs, (lambda r: 0 * r, lambda r: r, lambda r: (r % width) // size))
    if runs is None or bool((runs[0].abs() < 1e-6).any()):
        return None
    rows = _decoded(runs[1] / runs[0] - 1)
    positions = None if rows is None else [int(r) % width for r in rows]  # the position in a block of ``width``
    if positions is not None and sorted(positions) == list(range(width)):
        columns = [0] * width
        for column, position in enumerate(positions):
            columns[position] = column
        return tuple(columns)
    heads = _decoded(runs[2] / runs[0] - 1)
    if heads is None:
        return None
    read = [int(h) for h in heads]
    if read == [c // size for c in range(width)]:
        return tuple(range(width))
    if read == [c % tied.count for c in range(width)]:
        return tuple(d * tied.count + h for h in range(tied.count) for d in range(size))
    return None


def _decoded(found: torch.Tensor) -> torch.Tensor | None:
    """``found`` rounded, if every value is within 0.05 of an integer."""
    rounded = found.round()
    return rounded if float((found - rounded).abs().max()) <= 0.05 else None


def _coded_runs(
    tied: Tied, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], codes: tuple[Any, ...]
) -> list[torch.Tensor] | None:
    """The merging layer's input (one token) in a run of a copy of the module per code: its projections' weights
    zero, their biases one plus the code of their row numbers (counted over the projections in turn, each holding
    whole blocks of the heads' width)."""
    trial = _copy(tied.owner, model)
    twin: dict[nn.Module, Any] = dict(zip(tied.owner.modules(), trial.modules(), strict=True))
    merges = [twin[m] for m in tied.merges if m in twin]
    if not merges:
        return None
    rows, offset = [], 0
    for layer, _ in tied.roots:
        twin[layer].weight.data.zero_()
        rows.append(torch.arange(offset, offset + layer.out_features, dtype=torch.float32))
        offset += layer.out_features
    width = tied.count * tied.head_dim
    seen: list[torch.Tensor] = []
    handle = merges[0].register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().reshape(-1, width)[0]))
    try:
        for code in codes:
            for (layer, _), numbers in zip(tied.roots, rows, strict=True):
                twin[layer].bias = nn.Parameter((1 + code(numbers)).to(twin[layer].weight))
                if layer in functional.PIECES and not functional.set_rows(layer, twin[layer].bias.data, twin):
                    return None  # a bias added by a functional call, built on the fly: not coded
            with torch.no_grad():
                trial(*args, **kwargs)
        return [s.double() for s in seen[-len(codes) :]] if len(seen) >= len(codes) else None
    except Exception:  # a copy that cannot run so: unknown
        return None
    finally:
        handle.remove()


def _keep_rows(layer: nn.Linear, rows: list[int]) -> None:
    index = torch.tensor(rows, dtype=torch.long, device=layer.weight.device)
    layer.weight = nn.Parameter(layer.weight.data.index_select(0, index), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data.index_select(0, index), requires_grad=layer.bias.requires_grad)
    layer.out_features = len(rows)


def _keep_columns(layer: nn.Linear, columns: list[int]) -> None:
    index = torch.tensor(columns, dtype=torch.long, device=layer.weight.device)
    layer.weight = nn.Parameter(layer.weight.data.index_select(1, index), requires_grad=layer.weight.requires_grad)
    layer.in_features = len(columns)


def tied_heads(owner: nn.Module) -> bool:
    """Whether ``owner``'s heads are tied to its input (by the last :func:`find_tied`)."""
    return any(t.owner is owner for t in _TIED.values())


def cuts_tied(graph: Any, group: Any) -> bool:
    """Whether ``group`` cuts the rows of a tied module's projection into heads (its heads, or a per-head layer
    coupled to them, as a position-bias MLP ending in one output per head): such heads narrow only with their input."""
    return any(
        isinstance(dep.target.module, nn.Linear) and dep.target.module in _TIED and graph.is_out_channel_pruning_fn(dep.handler)
        for dep, _ in group
    )


def coupled(graph: Any, group: Any) -> list[Tied]:
    """The tied attention modules whose projections into heads read channels that ``group`` cuts."""
    found: dict[int, Tied] = {}
    for dep, _ in group:
        tied = _TIED.get(dep.target.module) if isinstance(dep.target.module, nn.Linear) else None
        if tied is not None and graph.is_in_channel_pruning_fn(dep.handler):
            found.setdefault(id(tied.owner), tied)
    return list(found.values())


def fit(group: _Group, tied: list[Tied]) -> None:
    """Round ``group``'s removal down to a multiple of every coupled module's head count, each head keeping a
    dimension at least; a group of units wider than one channel cannot be so matched and keeps them all."""
    if not tied or group.remove <= 0:
        return
    if group.per_unit != 1:
        group.remove = 0
        return
    step = math.lcm(*(t.count for t in tied))
    most = min(t.count * (t.head_dim - 1) for t in tied)
    group.remove = min(group.remove, most) // step * step


def choose(tied: list[Tied], removed: int) -> list[DimCut]:
    """For each module, the ``removed / count`` head dimensions of least weight norm (over its heads, its
    projections' blocks and its output projections' columns); chosen before the cut changes any of them."""
    cuts = []
    for module in tied:
        scores = torch.zeros(module.head_dim)
        for layer, fused in module.roots:
            rows = layer.weight.detach().float().norm(dim=1).view(fused, module.count, module.head_dim)
            scores += rows.sum(dim=(0, 1))
        for merge in module.merges:
            norms = merge.weight.detach().float().norm(dim=0)[list(module.columns)]
            scores += norms.view(module.count, module.head_dim).sum(dim=0)
        dims = torch.argsort(scores)[: removed // module.count]
        cuts.append(DimCut(module, tuple(sorted(int(d) for d in dims))))
    return cuts


def add_removals(cuts: list[DimCut], removed: dict[nn.Module, Removal]) -> None:
    """Add what ``cuts`` remove from each Linear layer to ``removed`` (the plan's removals, as the refit reads
    them): a layer the plan cuts too gets one removal holding both."""
    from ._structured_data import Removal

    def entry(layer: nn.Linear) -> Removal:
        return removed.setdefault(layer, Removal((layer.in_features, layer.out_features), set(), set()))

    for cut in cuts:
        for layer, fused in cut.tied.roots:
            entry(layer).outs.update(_rows(cut, fused))
        for merge in cut.tied.merges:
            entry(merge).ins.update(_columns(cut))


def _rows(cut: DimCut, blocks: int) -> list[int]:
    module, width = cut.tied, cut.tied.count * cut.tied.head_dim
    return [b * width + h * module.head_dim + d for b in range(blocks) for h in range(module.count) for d in cut.dims]


def _columns(cut: DimCut) -> list[int]:
    """The merging layers' columns of the cut dimensions."""
    return [cut.tied.columns[p] for p in _rows(cut, 1)]


def apply(cuts: list[DimCut]) -> None:
    """Cut the chosen head dimensions: projections' rows, output projections' columns, norms as wide as a head,
    and the module's attributes holding the head size or the heads' width."""
    for cut in cuts:
        module = cut.tied
        size = module.head_dim - len(cut.dims)
        for layer, fused in module.roots:
            gone = set(_rows(cut, fused))
            _keep_rows(layer, [i for i in range(layer.out_features) if i not in gone])
            functional.cut_pieces(layer, sorted(gone))
        gone = set(_columns(cut))
        for merge in module.merges:
            _keep_columns(merge, [i for i in range(merge.in_features) if i not in gone])
        kept = [d for d in range(module.head_dim) if d not in cut.dims]
        for norm in module.owner.modules():
            if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (module.head_dim,):
                _narrow_norm(norm, kept)
        _recount(module, size)


def _narrow_norm(norm: nn.LayerNorm, kept: list[int]) -> None:
    index = torch.tensor(kept, dtype=torch.long)
    for key in ("weight", "bias"):
        tensor = getattr(norm, key, None)
        if isinstance(tensor, nn.Parameter):
            setattr(norm, key, nn.Parameter(tensor.data.index_select(0, index.to(tensor.device))))
    norm.normalized_shape = (len(kept),)


def _recount(module: Tied, size: int) -> None:
    """The owner's integer attributes: the head size (named for a dimension or a head) and the heads' width
    (its input's too: both narrow) get their new values."""
    width = module.count * module.head_dim
    for key, value in list(vars(module.owner).items()):
        if type(value) is not int or key.startswith("_"):
            continue
        if value == width and width != module.count:
            setattr(module.owner, key, module.count * size)
        elif value == module.head_dim != module.count and ("dim" in key or "head" in key):
            setattr(module.owner, key, size)
