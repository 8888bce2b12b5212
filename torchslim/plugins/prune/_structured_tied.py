"""Attention whose head width is read from its input's width (``reshape(B, N, 3, H, C // H)`` with ``C`` from
``x.shape``, as XCiT's cross-covariance attention and VOLO's attention do): cut along with the residual stream.

Cutting such a model's residual stream from ``C`` to ``C'`` channels changes the head width the forward asks
for to ``C' / H``, while the projections into heads still have ``C / H`` rows per head: the forward breaks and
the stream was left whole. Here the stream's cut removes a multiple of ``H`` channels (:func:`rounding`), and
where the forward then breaks, :func:`retie` removes ``(C - C') / H`` dimensions from every head of those
projections (the same dimensions from the query, key and value of a head, and the matching columns of the
output projection, so that a head's pairs of dimensions stay paired in either kind of attention), chosen by
their weights' norms. Heads are found from the graph (``_head_split``); no name or class is looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _structured_functional as functional
from ._head_split import Split


@dataclass(frozen=True)
class Tied:
    """A projection into heads whose width equals its input's, and the heads' split."""

    layer: nn.Linear
    split: Split


def tied_in(plan: Any, found: dict[nn.Module, Split], graph: Any) -> list[Tied]:
    """The projections into heads as wide as their input whose inputs ``plan`` cuts."""
    tied = []
    for dep, _ in plan:
        layer, split = dep.target.module, found.get(dep.target.module)
        if (
            split is not None
            and isinstance(layer, nn.Linear)
            and graph.is_in_channel_pruning_fn(dep.handler)
            and layer.in_features == split.count * split.head_dim
            and layer.out_features == split.fused * split.count * split.head_dim
        ):
            tied.append(Tied(layer, split))
    return tied


def rounding(tied: list[Tied]) -> int:
    """What a cut of the channels feeding ``tied`` must remove a multiple of: the head count of every one whose
    module keeps no attribute holding its head width (the width is then read from the input; where it is kept,
    as timm's ``head_dim``, the cut needs no rounding and the heads stay as they are)."""
    counts = [t.split.count for t in tied if t.split.head_dim not in _integers(t.split.owner)]
    return math.lcm(*counts) if counts else 1


def _integers(module: nn.Module) -> set[int]:
    return {v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}


def retie(graph: Any, tied: list[Tied]) -> bool:
    """After a cut of their inputs: cut each owner's projections (and the output projection reading their heads)
    down to heads as wide as the input's new width divided by the head count. False where that width is not whole."""
    import torch_pruning as tp

    owners: dict[nn.Module, list[Tied]] = {}
    for t in tied:
        owners.setdefault(t.split.owner, []).append(t)
    for members in owners.values():
        split = members[0].split
        width = members[0].layer.in_features
        if width % split.count or any(t.layer.in_features != width or t.split.count != split.count for t in members):
            return False
        drop = split.head_dim - width // split.count
        if drop <= 0:
            continue
        readers = _readers(graph, members, split)
        dims = _weakest(members, readers, split, drop)
        for t in members:
            blocks = t.split.fused
            rows = [
                b * split.count * split.head_dim + h * split.head_dim + j
                for b in range(blocks)
                for h, js in enumerate(dims)
                for j in js
            ]
            tp.prune_linear_out_channels(t.layer, rows)
            functional.cut_pieces(t.layer, rows)  # a bias its functional call adds (_structured_functional)
        for reader in readers:
            tp.prune_linear_in_channels(reader, [h * split.head_dim + j for h, js in enumerate(dims) for j in js])
        _narrow_attributes(split, split.head_dim - drop)
    return True


def _narrow_attributes(split: Split, head_dim: int) -> None:
    """The owner's integer attributes holding the old head width take the new one (a module that sizes its heads
    from an attribute, cut along with the ones that read the input's width; not where the width equals the count)."""
    owner: Any = split.owner
    if split.head_dim == split.count:
        return
    for key, value in list(vars(owner).items()):
        if type(value) is int and not key.startswith("_") and value == split.head_dim:
            setattr(owner, key, head_dim)


def _readers(graph: Any, members: list[Tied], split: Split) -> list[nn.Linear]:
    """The Linear layers reading the heads' values (the output projection): those whose inputs Torch-Pruning's
    group of a projection's rows cuts, as wide as the heads."""
    width = split.count * split.head_dim
    found: list[nn.Linear] = []
    own = {t.layer for t in members}
    for t in members:
        pruner = graph.get_pruner_of_module(t.layer)
        group = graph.get_pruning_group(t.layer, pruner.prune_out_channels, [0])
        for dep, _ in group:
            module = dep.target.module
            if (
                isinstance(module, nn.Linear)
                and module not in own
                and module not in found
                and graph.is_in_channel_pruning_fn(dep.handler)
                and module.in_features == width
            ):
                found.append(module)
    return found


def _weakest(members: list[Tied], readers: list[nn.Linear], split: Split, drop: int) -> list[list[int]]:
    """For each head, the ``drop`` dimensions whose rows (in every block of every projection) and reader columns
    have the smallest summed L2 norm."""
    scores = torch.zeros(split.count, split.head_dim)
    for t in members:
        rows = t.layer.weight.detach().float().norm(dim=1)
        scores += rows.view(t.split.fused, split.count, split.head_dim).sum(dim=0)
    for reader in readers:
        scores += reader.weight.detach().float().norm(dim=0).view(split.count, split.head_dim)
    return [sorted(torch.argsort(head)[:drop].tolist()) for head in scores]
