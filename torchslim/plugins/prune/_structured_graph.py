"""Structured pruning, the graph side: Torch-Pruning's dependency graph built under a time limit,
its groups listed one by one (a group that cannot be listed is skipped and named), and which
layers feed the output."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...engine.errors import first_line
from .._layers import matches
from ._recurrent import RECURRENT_TYPES, recurrent_tracing

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *RECURRENT_TYPES)

if TYPE_CHECKING:
    from ._structured import ChannelState


class GraphTimeout(BaseException):
    """Tracing the dependency graph took longer than the time limit.

    An interrupt, raised from a signal handler anywhere in Torch-Pruning's code: a BaseException (as
    KeyboardInterrupt is) so that no ``except Exception`` on its way, the library's or torchslim's own
    "leave this group whole" handlers, swallows it; the stage turns it into its error."""


def _build_graph(model: nn.Module, example: torch.Tensor, log: logging.Logger, time_limit: float | None) -> Any:
    import torch_pruning as tp

    count = sum(1 for _ in model.modules())
    log.info("  structured: tracing the dependency graph (%d modules)%s", count,
             f", time limit {time_limit:g} s" if time_limit else "")
    started = time.monotonic()
    merging = {type(m): _MergingPruner() for m in model.modules() if _is_merging(m)}
    with recurrent_tracing(model) as recurrent:  # hidden units of LSTM/GRU/RNN (_recurrent)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                      customized_pruners={**merging, **recurrent} or None)
    log.info("  structured: dependency graph traced in %.1f s", time.monotonic() - started)
    return graph


def _is_merging(module: nn.Module) -> bool:
    """A patch-merging layer (Swin's): 2x2 neighbours' channels concatenated, normed, then a Linear.

    Torch-Pruning maps channel indices through its reshape wrongly; it is pruned as one layer instead.
    """
    norm, reduction = getattr(module, "norm", None), getattr(module, "reduction", None)
    return (type(module).__name__.endswith("PatchMerging") and isinstance(reduction, nn.Linear)
            and isinstance(norm, nn.LayerNorm) and reduction.in_features % 4 == 0
            and tuple(norm.normalized_shape) == (reduction.in_features,) and reduction.bias is None)


def _merging_pruner_base() -> Any:
    import torch_pruning as tp

    return tp.pruner.function.BasePruningFunc


class _MergingPruner:
    """Prunes a patch-merging layer: input channel c is the features k*C + c (k = 0..3) of norm and reduction."""

    def __new__(cls) -> Any:
        base = _merging_pruner_base()

        class MergingPruner(base):  # type: ignore[misc, valid-type]
            TARGET_MODULES = None

            def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> Any:
                keep = [i for i in range(layer.reduction.out_features) if i not in set(idxs)]
                layer.reduction.weight = nn.Parameter(layer.reduction.weight.data[keep].clone())
                layer.reduction.out_features = len(keep)
                if isinstance(getattr(layer, "out_dim", None), int):
                    layer.out_dim = len(keep)
                return layer

            def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> Any:
                channels = layer.reduction.in_features // 4
                gone = set(int(i) for i in idxs)
                keep = [i for i in range(channels) if i not in gone]
                full = torch.tensor([k * channels + c for k in range(4) for c in keep])
                layer.reduction.weight = nn.Parameter(layer.reduction.weight.data[:, full].clone())
                layer.reduction.in_features = len(full)
                norm = layer.norm
                if norm.weight is not None:
                    norm.weight = nn.Parameter(norm.weight.data[full].clone())
                if norm.bias is not None:
                    norm.bias = nn.Parameter(norm.bias.data[full].clone())
                norm.normalized_shape = (len(full),)
                if isinstance(getattr(layer, "dim", None), int):
                    layer.dim = len(keep)
                return layer

            def get_out_channels(self, layer: Any) -> int:
                return int(layer.reduction.out_features)

            def get_in_channels(self, layer: Any) -> int:
                return int(layer.reduction.in_features) // 4

        return MergingPruner()


@contextmanager
def _deadline(seconds: float | None, log: logging.Logger) -> Iterator[None]:
    """Raise :class:`GraphTimeout` after ``seconds``: in the main thread of a system with timer signals,
    the only place a signal can interrupt the library's loops; elsewhere the limit is logged as not kept."""
    if not seconds:
        yield
        return
    unable = ("no timer signal on this system" if not hasattr(signal, "setitimer")
              else "not in the main thread" if threading.current_thread() is not threading.main_thread() else None)
    if unable:
        log.warning("  structured: time_limit=%g s is not enforced here (%s): the stage runs as long as it takes",
                    seconds, unable)
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise GraphTimeout(f"tracing the dependency graph and listing its groups took more than "
                           f"time_limit={seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _all_groups(graph: Any, protected: list[nn.Module], state: ChannelState) -> Iterator[Any]:
    groups = graph.get_all_groups(ignored_layers=protected, root_module_types=list(ROOT_TYPES))
    while True:
        try:
            group = next(groups)
        except StopIteration:
            return
        except Exception as exc:
            state.skipped.setdefault("(remaining groups)", f"listing the groups raised {first_line(exc, typed=True, limit=200)}")
            return
        yield group


def _protected(graph: Any, names: dict[nn.Module, str], exclude: Sequence[str]) -> list[nn.Module]:
    outputs: list[nn.Module] = [m for m in graph.module2node
                                if isinstance(m, ROOT_TYPES) and _feeds_output(graph.module2node[m])]
    excluded = [m for m, name in names.items()
                if isinstance(m, ROOT_TYPES) and matches(name, exclude)]
    return outputs + [m for m in excluded if m not in outputs]


def _feeds_output(node: Any) -> bool:
    """Whether the layer's output reaches the model's output without passing another Conv/Linear.

    Tracing starts from the outputs, so a node without successors is an output of the model.
    """
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if not current.outputs:
            return True
        stack.extend(n for n in current.outputs if not isinstance(n.module, ROOT_TYPES))
    return False


def _channel_groups(graph: Any, group: Any) -> int:
    # A grouped (not depthwise) conv, or a GroupNorm, needs the same channels removed from each
    # of its groups: rank "units" of one channel per group instead of single channels.
    counts = [1]
    for dep, _ in group:
        module, handler = dep.target.module, dep.handler
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or not isinstance(module, nn.Module):
            continue
        if graph.is_out_channel_pruning_fn(handler):
            counts.append(int(pruner.get_out_channel_groups(module)))
        elif graph.is_in_channel_pruning_fn(handler):
            counts.append(int(pruner.get_in_channel_groups(module)))
    return max(counts)
