"""Structured pruning, the graph side: Torch-Pruning's dependency graph, its groups listed one by one
under the time limit (a group that cannot be listed, or not in time, is skipped and named), and which
layers feed the output."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...engine.errors import first_line
from .._layers import matches
from . import _structured_slices as slices
from ._recurrent import RECURRENT_TYPES, recurrent_tracing
from ._structured_clock import ONE_GROUP, Clock, GroupTimeout
from ._structured_functional import routed
from ._structured_heads import prepare as prepare_heads
from ._structured_layers import LayerPruner, customized, keep
from ._structured_repair import couple_multipliers, multiplier, narrowest, sound
from ._structured_trace import build

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *RECURRENT_TYPES)


def _build_graph(
    model: nn.Module,
    example: torch.Tensor,
    log: logging.Logger,
    time_limit: float | None,
    pruners: Mapping[type, LayerPruner] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[Any, dict[Any, str]]:
    """Torch-Pruning's dependency graph of ``model`` traced on ``example`` (by ``forward(model, example)``, which
    may reach other branches too), with the patch-merging layers and the user's own layer types (``pruners``) cut by their own
    pruners, and the graph nodes no channel index could be mapped through (``_structured_trace``), each with why."""
    count = sum(1 for _ in model.modules())
    log.info(
        "  structured: tracing the dependency graph (%d modules)%s", count, f", time limit {time_limit:g} s" if time_limit else ""
    )
    started = time.monotonic()
    merging: dict[type, LayerPruner] = {type(m): _Merging() for m in model.modules() if _is_merging(m)}
    special = customized({**merging, **(pruners or {})})
    with routed(model):  # a layer's weight used by a functional call: seen as a call of the layer
        special.update(prepare_heads(model, example))  # heads found from the graph; nn.MultiheadAttention's pruner
        with recurrent_tracing(model) as recurrent, slices.watch(model) as splits:  # LSTM/GRU/RNN: _recurrent
            graph, unmapped = build(model, example, {**special, **recurrent} or None, forward)
    couple_multipliers(graph)  # widening depthwise convolutions: their inputs and outputs go together
    slices.adopt(graph, splits)  # channel splits by sizes the model keeps: resized after a cut
    slices.order_splits(graph)
    slices.order_mappings(graph)
    log.info("  structured: dependency graph traced in %.1f s", time.monotonic() - started)
    for reason in unmapped.values():
        log.warning("  structured: the groups whose %s are left whole", reason.removeprefix("its "))
    return graph, unmapped


def _is_merging(module: nn.Module) -> bool:
    """A patch-merging layer (Swin's): 2x2 neighbours' channels concatenated, then a Linear, normed before it
    (Swin) or after it (Swin V2).

    Torch-Pruning maps channel indices through its reshape wrongly; it is pruned as one layer instead.
    """
    norm, reduction = getattr(module, "norm", None), getattr(module, "reduction", None)
    return (
        type(module).__name__.endswith("PatchMerging")
        and isinstance(reduction, nn.Linear)
        and isinstance(norm, nn.LayerNorm)
        and reduction.in_features % 4 == 0
        and reduction.bias is None
        and reduction.in_features != reduction.out_features
        and tuple(norm.normalized_shape) in ((reduction.in_features,), (reduction.out_features,))
    )


class _Merging:
    """Prunes a patch-merging layer (a :class:`LayerPruner`): input channel c is the features k*C + c
    (k = 0..3) of its reduction (and of its norm, where the norm comes first)."""

    def out_channels(self, layer: Any) -> int:
        return int(layer.reduction.out_features)

    def in_channels(self, layer: Any) -> int:
        return int(layer.reduction.in_features) // 4

    def keep_out(self, layer: Any, kept: torch.Tensor) -> None:
        if tuple(layer.norm.normalized_shape) == (layer.reduction.out_features,):
            _narrow_norm(layer.norm, kept)
        keep(layer.reduction, "weight", 0, kept)
        layer.reduction.out_features = len(kept)
        if isinstance(getattr(layer, "out_dim", None), int):
            layer.out_dim = len(kept)

    def keep_in(self, layer: Any, kept: torch.Tensor) -> None:
        channels = self.in_channels(layer)
        full = torch.tensor([k * channels + int(c) for k in range(4) for c in kept])
        if tuple(layer.norm.normalized_shape) == (layer.reduction.in_features,):
            _narrow_norm(layer.norm, full)
        keep(layer.reduction, "weight", 1, full)
        layer.reduction.in_features = len(full)
        if isinstance(getattr(layer, "dim", None), int):
            layer.dim = len(kept)


def _narrow_norm(norm: nn.LayerNorm, kept: torch.Tensor) -> None:
    for key in ("weight", "bias"):
        if getattr(norm, key, None) is not None:
            keep(norm, key, 0, kept)
    norm.normalized_shape = (len(kept),)


def _all_groups(
    graph: Any,
    protected: list[nn.Module],
    clock: Clock,
    roots: tuple[type[nn.Module], ...] = ROOT_TYPES,
    unmapped: Mapping[Any, str] | None = None,
) -> Iterator[tuple[nn.Module, Any, str | None]]:
    """``(root, group, None)`` for Torch-Pruning's group of every root layer's output channels, one root at a
    time (as its ``get_all_groups`` lists them), or ``(root, None, why)`` for a group that fails or takes too
    long to list, or whose channels reach a node in ``unmapped``, so that the others are listed; past the
    listing share of the time limit, :class:`GraphTimeout`.

    A group that takes more than a quarter of its share is put off until the quick ones are listed."""
    ignored = set(protected) | set(graph.IGNORED_LAYERS_IN_TRACING)
    unreachable: Mapping[Any, str] = unmapped or {}
    visited: set[nn.Module] = set()
    slow: list[nn.Module] = []
    candidates = [m for m in graph.module2node if isinstance(m, roots) and m not in ignored]
    for share, modules in ((ONE_GROUP / 4, candidates), (ONE_GROUP, slow)):
        for module in modules:
            if module in visited:
                continue
            clock.check_listing()
            pruner = graph.get_pruner_of_module(module)
            channels = None if pruner is None else pruner.get_out_channels(module)
            if channels is None or channels <= 1:
                continue  # one channel has none to give (and its group holds those it is broadcast over)
            try:
                with clock.one_group(share):
                    module, group = _listed(graph, module, channels, roots, ignored)
            except GroupTimeout as exc:
                if modules is candidates:
                    slow.append(module)
                else:
                    yield (
                        module,
                        None,
                        (
                            f"{exc} (Torch-Pruning maps its channels through reshapes to many "
                            "indices); exclude it, or raise time_limit"
                        ),
                    )
                continue
            except Exception as exc:
                yield module, None, f"listing its group raised {first_line(exc, typed=True, limit=200)}"
                continue
            cut = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
            visited.update(m for m in cut if isinstance(m, nn.Module))
            unmappable = next((unreachable[d.target] for d, _ in group if d.target in unreachable), None)
            if unmappable is not None:
                yield module, None, unmappable
            elif not any(m in ignored for m in cut if isinstance(m, nn.Module)):
                yield module, group, None


def _listed(
    graph: Any, module: nn.Module, channels: int, roots: tuple[type[nn.Module], ...], ignored: set[nn.Module]
) -> tuple[nn.Module, Any]:
    """Torch-Pruning's group of all ``channels`` of ``module`` made sound (``_structured_repair``), and its root:
    ``module``, or the narrowest layer of a group that widens through a channel-multiplier convolution."""
    group = sound(
        graph, graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, list(range(channels)))
    )
    narrow = narrowest(graph, group, module, roots, ignored)
    if narrow is None:
        return module, group
    pruner = graph.get_pruner_of_module(narrow)
    return narrow, sound(
        graph, graph.get_pruning_group(narrow, pruner.prune_out_channels, list(range(pruner.get_out_channels(narrow))))
    )


def _protected(
    graph: Any,
    names: dict[nn.Module, str],
    exclude: Sequence[str],
    roots: tuple[type[nn.Module], ...] = ROOT_TYPES,
    joins: Container[Any] = (),
) -> list[nn.Module]:
    """The output layers (``joins``: autograd nodes of traced outputs that are not the model's) and the excluded ones."""
    outputs: list[nn.Module] = [
        m for m in graph.module2node if isinstance(m, roots) and _feeds_output(graph.module2node[m], roots, joins)
    ]
    excluded = [m for m, name in names.items() if isinstance(m, roots) and matches(name, exclude)]
    return outputs + [m for m in excluded if m not in outputs]


def _feeds_output(node: Any, roots: tuple[type[nn.Module], ...], joins: Container[Any] = ()) -> bool:
    """Whether the layer's output reaches the model's output without passing another Conv/Linear (or ``roots``).

    Tracing starts from the outputs, so a node without successors is an output of the model.
    """
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if not current.outputs and current.grad_fn not in joins:
            return True
        stack.extend(n for n in current.outputs if not isinstance(n.module, roots))
    return False


def _channel_groups(graph: Any, group: Any) -> int:
    # A grouped (not depthwise) conv, or a GroupNorm, needs the same channels removed from each
    # of its groups: rank "units" of one channel per group instead of single channels.
    counts = [1, _paired(graph, group)]
    for dep, _ in group:
        module, handler = dep.target.module, dep.handler
        if isinstance(module, nn.modules.conv._ConvNd) and (module.groups == module.out_channels or multiplier(module)):
            continue  # depthwise, or widening depthwise: its channels are coupled one to one (or to m), not by group
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or not isinstance(module, nn.Module):
            continue
        if graph.is_out_channel_pruning_fn(handler):
            counts.append(int(pruner.get_out_channel_groups(module)))
        elif graph.is_in_channel_pruning_fn(handler):
            counts.append(int(pruner.get_in_channel_groups(module)))
    return max(counts)


def _paired(graph: Any, group: Any) -> int:
    """``k`` where the root's channels go ``k`` at a time, ``u, u + n/k, ...`` (the halves of a split read together,
    ``h * act(z)``: removing row ``u`` removes its partner too, so a unit is the pair); else 1. Probed only where a
    split in the group maps its pieces by the piece each consumer reads (``_structured_slices.map_by_piece``)."""
    if not any(getattr(dep.target.module, "pieces", None) is not None for dep, _ in group):
        return 1
    root = group[0].dep.target.module
    probe = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, [0])
    own = sorted({int(i) for dep, idxs in probe if dep.target.module is root for i in idxs})
    channels = int(getattr(root, "out_channels", 0) or getattr(root, "out_features", 0))
    k = len(own)
    if k < 2 or not channels or channels % k or own != [j * (channels // k) for j in range(k)]:
        return 1
    return k
