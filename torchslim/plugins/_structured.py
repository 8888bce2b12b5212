"""Structured pruning: whole output channels and neurons removed, through torch-pruning's dependency graph.

torch-pruning traces the model and groups the layers whose channels are coupled (a conv and its
BatchNorm, the convs joined by a residual addition, a depthwise conv and the layer feeding it, a
squeeze-excite gate and the features it scales, concatenations). This module ranks the groups'
channels itself, so that a per-layer ceiling, ``round_to`` and global or per-layer ranking behave
as torchslim documents them, and asks torch-pruning only to cut the chosen channels. Its API
stays inside this module.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._layers import matches

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ChannelOptions:
    """How channels are ranked and how many may go."""

    scope: str
    """``global`` or ``layer``."""
    norm: int
    """1 for L1 importance, 2 for L2."""
    round_to: int
    """Channel counts left are multiples of this (where the layer is large enough)."""
    ceiling: float
    """At most this fraction of any group's original channels is removed."""
    exclude: Sequence[str]
    """Layer name patterns whose channels stay."""


@dataclass
class _Group:
    """One set of coupled channels: the root layer, its channel importances, what may go."""

    name: str
    root: nn.Module
    importance: torch.Tensor
    """One score per unit; a unit is ``per_unit`` channels (grouped convs prune all groups alike)."""
    per_unit: int
    units: int
    removable: int
    """Units that may still be removed in this step without passing the ceiling."""
    remove: int = 0
    heads: Any = None
    """The attention module whose heads are this group's units (``num_heads`` is updated), or None."""
    head_dim: int = 0


@dataclass
class ChannelState:
    """What a multi-step structured prune remembers between steps."""

    original: dict[str, int] = field(default_factory=dict)
    """Output channels of each group's root layer (by name) before the first step."""
    protected: list[str] = field(default_factory=list)
    """Layers left alone: the model's output layers and the excluded ones."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Groups left whole (by root layer name) and why: Torch-Pruning's check refused them, scoring or
    cutting them raised, or the pruned model's forward broke (the cut is undone)."""
    heads: dict[str, int] = field(default_factory=dict)
    """Attention modules pruned by whole heads: heads removed so far."""


class GraphTimeout(RuntimeError):
    """Tracing the dependency graph took longer than the time limit."""


def prune_step(model: nn.Module, example: torch.Tensor, fraction: float, opts: ChannelOptions, state: ChannelState,
               log: logging.Logger | None = None, time_limit: float | None = None) -> None:
    """Remove channels so that ``fraction`` of the original prunable channels are gone after this step.

    A group that Torch-Pruning refuses (its check fails, scoring or cutting it raises) or whose cut
    breaks the model's forward is left whole and named in ``state.skipped``; under global scope its
    share of the budget goes to the other groups. Attention layers (a module with ``num_heads`` and
    a ``qkv`` Linear, as in timm) are pruned by whole heads.
    """
    log = log or logging.getLogger("torchslim")
    for _ in range(3):  # a cut undone after the choice: trace again and give its share to the others
        undone = _prune_pass(model, example, fraction, opts, state, log, time_limit)
        if not undone or opts.scope != "global":
            return
        log.info("  structured: %d cut(s) undone; giving their share to the other groups", undone)


def _prune_pass(model: nn.Module, example: torch.Tensor, fraction: float, opts: ChannelOptions, state: ChannelState,
                log: logging.Logger, time_limit: float | None) -> int:
    """One trace, choice and cut; returns how many chosen cuts were refused or undone."""
    with _deadline(time_limit):  # Torch-Pruning can spend minutes both tracing and listing the groups
        graph, groups = _graph_and_groups(model, example, opts, state, log, time_limit)
    modules = dict(model.named_modules())
    if opts.scope == "global":
        _choose_global(groups, fraction, state, modules)
    else:
        _choose_per_layer(groups, fraction, state)
    started = time.monotonic()
    with torch.no_grad():
        expected = _shapes_of(model(example))
    before = len(state.skipped)
    for group in groups:
        _round(group, opts.round_to)
        _cut(model, graph, group, example, expected, state)
    log.info("  structured: cut %d groups in %.1f s (%d left whole)", len(groups), time.monotonic() - started,
             len(state.skipped))
    return len(state.skipped) - before


def _graph_and_groups(model: nn.Module, example: torch.Tensor, opts: ChannelOptions, state: ChannelState,
                      log: logging.Logger, time_limit: float | None) -> tuple[Any, list[_Group]]:
    import torch_pruning as tp

    graph = _build_graph(model, example, log, time_limit)
    names = {module: name for name, module in model.named_modules()}
    protected = _protected(graph, names, opts.exclude)
    state.protected = sorted(names[m] for m in protected)
    scorer = tp.importance.GroupMagnitudeImportance(p=opts.norm, group_reduction="mean", normalizer="mean")
    groups = []
    for group in _all_groups(graph, protected, state):
        root = group[0].dep.target.module
        name = names.get(root, type(root).__name__)
        if name in state.skipped:
            continue
        try:
            described = _describe(graph, group, names, scorer, opts, state)
        except GraphTimeout:
            raise
        except Exception as exc:
            _skip(state, name, root, f"scoring raised {_first_line(exc)}")
            continue
        if described is None:
            continue
        problem = _precheck(graph, described)
        if problem:
            _skip(state, name, root, problem)
            continue
        groups.append(described)
    log.info("  structured: %d groups listed and scored", len(groups))
    return graph, groups


def _build_graph(model: nn.Module, example: torch.Tensor, log: logging.Logger, time_limit: float | None) -> Any:
    import torch_pruning as tp

    count = sum(1 for _ in model.modules())
    log.info("  structured: tracing the dependency graph (%d modules)%s", count,
             f", time limit {time_limit:g} s" if time_limit else "")
    started = time.monotonic()
    merging = {type(m): _MergingPruner() for m in model.modules() if _is_merging(m)}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                  customized_pruners=merging or None)
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
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`GraphTimeout` after ``seconds`` (main thread only, where signals can be used)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
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
        except GraphTimeout:
            raise
        except Exception as exc:
            state.skipped.setdefault("(remaining groups)", f"listing the groups raised {_first_line(exc)}")
            return
        yield group


def _first_line(exc: BaseException) -> str:
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _skip(state: ChannelState, name: str, root: nn.Module, reason: str) -> None:
    state.skipped.setdefault(name, reason)
    state.original.setdefault(name, _out_channels(root))


def _precheck(graph: Any, group: _Group) -> str | None:
    """Why Torch-Pruning cannot cut even the least important unit of this group (None: it can)."""
    if group.removable <= 0:
        return None
    try:
        plan = _plan(graph, group, 1)
        if not graph.check_pruning_group(plan):
            return "Torch-Pruning's check refused it (a coupled layer would lose all its channels)"
    except GraphTimeout:
        raise
    except Exception as exc:
        return f"building its pruning plan raised {_first_line(exc)}"
    return None


def pruned_fraction(model: nn.Module, state: ChannelState) -> float:
    """Fraction of the prunable channels (of the groups seen in the first step) removed so far."""
    modules = dict(model.named_modules())
    before = sum(state.original.values())
    after = sum(_out_channels(modules[name]) for name in state.original)
    return 1.0 - after / before if before else 0.0


def _out_channels(module: nn.Module) -> int:
    value: Any = getattr(module, "out_channels", None) or getattr(module, "out_features", 0)
    return int(value)


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


def _describe(graph: Any, group: Any, names: dict[nn.Module, str], scorer: Any, opts: ChannelOptions,
              state: ChannelState) -> _Group | None:
    root = group[0].dep.target.module
    importance = scorer(group)
    if importance is None or root not in names:
        return None
    per_unit = _channel_groups(graph, group)
    units = int(importance.numel()) // per_unit
    if per_unit > 1:
        importance = importance.view(per_unit, units).mean(dim=0)
    name = names[root]
    attention = _attention_of(root, names)
    if attention is not None and per_unit == 1:
        return _describe_heads(name, root, attention, importance, opts, state)
    original = state.original.setdefault(name, units * per_unit) // per_unit
    removable = max(0, int(opts.ceiling * original) - (original - units))
    return _Group(name, root, importance.detach().float().cpu(), per_unit, units, min(removable, units - 1))


def _attention_of(root: nn.Module, names: dict[nn.Module, str]) -> nn.Module | None:
    """The attention module whose ``qkv`` Linear is ``root`` (timm's layout), if any."""
    if not isinstance(root, nn.Linear):
        return None
    name = names.get(root, "")
    if not name.endswith("qkv"):
        return None
    parent_name = name.rpartition(".")[0]
    parent = next((m for m, n in names.items() if n == parent_name), None)
    heads = getattr(parent, "num_heads", None)
    if not isinstance(heads, int) or heads < 2 or root.out_features % (3 * heads):
        return None
    head_dim = getattr(parent, "head_dim", root.out_features // (3 * heads))
    if not isinstance(head_dim, int) or root.out_features != 3 * heads * head_dim:
        return None
    return parent


def _describe_heads(name: str, root: Any, attention: Any, importance: torch.Tensor,
                    opts: ChannelOptions, state: ChannelState) -> _Group | None:
    """A group whose units are whole heads: head h is the q/k/v channels h*head_dim ... (h+1)*head_dim-1."""
    heads = int(attention.num_heads)
    head_dim = int(root.out_features) // (3 * heads)
    scores = importance.detach().float().cpu().flatten()
    if scores.numel() == 3 * heads * head_dim:
        scores = scores.view(3, heads, head_dim).mean(dim=(0, 2))
    elif scores.numel() == heads * head_dim:
        scores = scores.view(heads, head_dim).mean(dim=1)
    else:
        return None
    original_heads = (state.original.setdefault(name, heads * head_dim * 3)) // (3 * head_dim)
    removable = max(0, int(opts.ceiling * original_heads) - (original_heads - heads))
    # per_unit counts channels for the budget: one head is head_dim channels of q (k and v follow it)
    return _Group(name, root, scores, 3 * head_dim, heads, min(removable, heads - 1), heads=attention,
                  head_dim=head_dim)


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


def _choose_per_layer(groups: list[_Group], fraction: float, state: ChannelState) -> None:
    for group in groups:
        original = state.original[group.name] // group.per_unit
        target = int(fraction * original + 0.5) - (original - group.units)
        group.remove = max(0, min(target, group.removable))


def _choose_global(groups: list[_Group], fraction: float, state: ChannelState,
                   modules: dict[str, nn.Module]) -> None:
    """Rank every group's candidate units together; each group offers only the units its ceiling allows.

    The budget is ``fraction`` of all the prunable channels, those of the groups left whole included:
    their share goes to the groups that can be pruned.
    """
    original = sum(state.original.values())
    current = sum(_out_channels(modules[name]) for name in state.original if name in modules)
    budget = int(fraction * original + 0.5) - (original - current)
    # Attention heads are ranked within their layer (as Torch-Pruning's head pruning ratio does): a
    # head's score averages 3 x head_dim weights and would rarely rank below single channels.
    for group in groups:
        if group.heads is not None:
            heads = state.original[group.name] // group.per_unit
            group.remove = max(0, min(int(fraction * heads + 0.5) - (heads - group.units), group.removable))
            budget -= group.remove * group.per_unit
    # A group whose score averages many coupled layers (a residual stream) varies less than a single
    # layer's and would never reach the bottom of the ranking: a channel ranks by the lower of its
    # score relative to its group's mean and its standing in its group scaled to a typical group's spread.
    ranked = [g for g in groups if g.heads is None]
    typical = _typical_spread(ranked)
    candidates = [(float(score), index) for index, g in enumerate(groups) if g.heads is None
                  for score in torch.sort(_comparable(g.importance, typical)).values[: g.removable].tolist()]
    for _, index in sorted(candidates):
        group = groups[index]
        if budget < group.per_unit:
            break
        group.remove += 1
        budget -= group.per_unit


def _relative(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _typical_spread(groups: list[_Group]) -> float:
    spreads = [float(_relative(g.importance).std()) for g in groups if g.importance.numel() > 1]
    return float(torch.tensor(spreads).median()) if spreads else 0.0


def _comparable(scores: torch.Tensor, typical: float) -> torch.Tensor:
    relative = _relative(scores)
    if relative.numel() < 2 or not typical:
        return relative
    spread = float(relative.std())
    if spread <= 0:
        return relative
    return torch.minimum(relative, 1.0 + (relative - relative.mean()) / spread * typical)


def _round(group: _Group, round_to: int) -> None:
    """Move the channel count left to the nearest multiple of ``round_to``, within the ceiling."""
    if round_to <= 1 or group.per_unit > 1 or group.units <= round_to:
        return
    least = group.units - group.removable
    kept = int((group.units - group.remove) / round_to + 0.5) * round_to
    if kept < least:
        kept = -(-least // round_to) * round_to
    group.remove = group.units - min(max(kept, round_to), group.units)


def _channels(group: _Group, count: int) -> list[int]:
    """Output channels of the root layer for the ``count`` least important units."""
    units = torch.argsort(group.importance)[:count].tolist()
    if group.heads is not None:  # q channels of whole heads; Torch-Pruning adds the k and v ones
        return sorted(u * group.head_dim + d for u in units for d in range(group.head_dim))
    return sorted(u + k * group.units for u in units for k in range(group.per_unit))


def _plan(graph: Any, group: _Group, count: int) -> Any:
    """Torch-Pruning's plan for cutting ``count`` units; for heads, without the attention's own per-head
    tensors (relative position biases), which :func:`_drop_heads` slices by head, not by channel."""
    plan = graph.get_pruning_group(group.root, graph.get_pruner_of_module(group.root).prune_out_channels,
                                   _channels(group, count))
    if group.heads is not None:
        own = {id(t) for t in group.heads._parameters.values() if t is not None}
        plan._group = [item for item in plan._group if id(item.dep.target.module) not in own]
    return plan


def _cut(model: nn.Module, graph: Any, group: _Group, example: torch.Tensor, expected: Any,
         state: ChannelState) -> None:
    """Cut the chosen units; undo the cut (and leave the group whole) if the model's forward then fails."""
    if group.remove <= 0:
        return
    try:
        plan = _plan(graph, group, group.remove)
        if not graph.check_pruning_group(plan):
            state.skipped.setdefault(group.name, "Torch-Pruning's check refused the cut (a coupled layer would "
                                     "lose all its channels)")
            return
    except Exception as exc:
        state.skipped.setdefault(group.name, f"building its pruning plan raised {_first_line(exc)}")
        return
    saved = _save(model)
    try:
        plan.prune()
        if group.heads is not None:
            _drop_heads(group)
        with torch.no_grad():
            got = _shapes_of(model(example))
        if got != expected:
            raise RuntimeError(f"output shape changed from {expected} to {got}")
    except Exception as exc:
        _load(saved)
        state.skipped.setdefault(group.name, f"the pruned forward failed ({_first_line(exc)}); cut undone")
        return
    if group.heads is not None:
        state.heads[group.name.rpartition(".")[0]] = state.heads.get(group.name.rpartition(".")[0], 0) + group.remove


def _shapes_of(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (list, tuple)):
        return tuple(_shapes_of(o) for o in output)
    if isinstance(output, dict):
        return tuple((k, _shapes_of(v)) for k, v in output.items())
    return None


def _drop_heads(group: _Group) -> None:
    """Update the attention module's head count, and slice its own per-head tensors (relative position biases)."""
    attention, kept = group.heads, torch.sort(torch.argsort(group.importance)[group.remove:]).values
    old = int(attention.num_heads)
    attention.num_heads = old - group.remove
    if isinstance(getattr(attention, "attn_dim", None), int):
        attention.attn_dim = attention.num_heads * group.head_dim
    for key, tensor in list(attention._parameters.items()) + list(attention._buffers.items()):
        if tensor is None or tensor.dtype in (torch.long, torch.int) or old not in tensor.shape:
            continue
        dim = max(i for i, size in enumerate(tensor.shape) if size == old)
        sliced = torch.index_select(tensor.data, dim, kept.to(tensor.device))
        if key in attention._parameters:
            attention._parameters[key] = nn.Parameter(sliced, requires_grad=tensor.requires_grad)
        else:
            attention._buffers[key] = sliced


def _save(model: nn.Module) -> list[tuple[Any, ...]]:
    """What a cut may change, by reference (no tensor is copied): module attributes and tensors."""
    modules = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    data = [(p, p.data) for p in model.parameters()]
    return [*modules, *[(p, d) for p, d in data]]


def _load(saved: list[tuple[Any, ...]]) -> None:
    for entry in saved:
        if len(entry) == 4:
            module, attributes, parameters, buffers = entry
            module.__dict__.clear()
            module.__dict__.update(attributes)
            module.__dict__["_parameters"] = dict(parameters)
            module.__dict__["_buffers"] = dict(buffers)
    for entry in saved:
        if len(entry) == 2:
            entry[0].data = entry[1]
