"""Torch-Pruning's groups made sound where its graph couples channels wrongly or not at all.

Two mechanisms, neither tied to an architecture:

- **Convolutions with a channel multiplier** (``groups == in_channels``, ``out_channels = m * in_channels``,
  ``m > 1``: a depthwise convolution that widens, as mobile networks downsample). Torch-Pruning does not
  couple their input and output channels, cuts their input channels as if the weight had a column per
  input (it has one per group), and its magnitude scoring fails on them. :func:`couple_multipliers` couples
  input channel ``c`` with output channels ``m*c .. m*c+m-1`` in both directions; :func:`sound` leaves their
  input-channel items out of a group (the output-channel items carry their weight rows); :func:`settle`
  gives them their new input and group counts after a cut.
- **Channels mapped where they do not exist.** Where the graph maps a group's channel indices through an
  operation that reduces or broadcasts the channel axis (a spatial attention's mean over the channels, the
  one-channel gate it multiplies the features by), layers with fewer channels than the indices join the
  group and its scoring fails (``index 24 is out of bounds for dimension 0 with size 1``). :func:`sound`
  leaves out every item whose indices its layer does not have, and every one-channel item (a scalar gain
  broadcast over the channels); the forward check after the cut undoes a cut that this leaves inconsistent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


def multiplier(module: Any) -> int:
    """The channel multiplier of a widening depthwise convolution (``groups == in_channels``, ``out_channels``
    a multiple > 1 of it); 0 for any other layer."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed:
        return 0
    inputs, outputs = module.in_channels, module.out_channels
    if module.groups != inputs or inputs <= 1 or outputs <= inputs or outputs % inputs:
        return 0
    return outputs // inputs


class _Expand:
    """Input channel c -> output channels m*c .. m*c+m-1 (Torch-Pruning's index mapping, on its hybrid indices)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, idxs: Sequence[Any]) -> list[Any]:
        from torch_pruning import _helpers

        return [_helpers._HybridIndex(idx=i.idx * self.factor + j, root_idx=i.root_idx) for i in idxs for j in range(self.factor)]


class _Collapse:
    """Output channel o -> input channel o // m, each input once."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, idxs: Sequence[Any]) -> list[Any]:
        from torch_pruning import _helpers

        seen: set[int] = set()
        found = []
        for i in idxs:
            channel = i.idx // self.factor
            if channel not in seen:
                seen.add(channel)
                found.append(_helpers._HybridIndex(idx=channel, root_idx=i.root_idx))
        return found


def couple_multipliers(graph: Any) -> int:
    """Couple each channel-multiplier convolution's input channels with its output channels in ``graph``;
    returns how many were coupled."""
    from torch_pruning.dependency.dependency import Dependency

    coupled = 0
    for module, node in graph.module2node.items():
        factor = multiplier(module)
        if not factor:
            continue
        pruner = graph.get_pruner_of_module(module)
        forward = Dependency(trigger=pruner.prune_in_channels, handler=pruner.prune_out_channels, source=node, target=node)
        forward.index_mapping = [_Expand(factor), None]
        backward = Dependency(trigger=pruner.prune_out_channels, handler=pruner.prune_in_channels, source=node, target=node)
        backward.index_mapping = [_Collapse(factor), None]
        node.dependencies += [forward, backward]
        coupled += 1
    return coupled


def sound(graph: Any, group: Any) -> Any:
    """``group`` without the items Torch-Pruning cannot score or cut as it maps them: a channel-multiplier
    convolution's input channels, and any layer's indices beyond its channel count (the group itself is
    changed and returned)."""
    items = group._group
    group._group = items[:1] + [item for item in items[1:] if _sound(graph, item.dep, item.idxs)]
    # what was left out, for the per-head tensors of attention (_head_items): their indices are heads, not channels
    group.unsound = [item for item in items[1:] if item not in group._group]
    return group  # the root's own item is kept: the group is described by it


def _sound(graph: Any, dep: Any, idxs: Sequence[int]) -> bool:
    module = dep.target.module
    if not isinstance(module, (nn.Module, nn.Parameter)) or not idxs:
        return True
    pruner = graph.get_pruner_of_module(module)
    if pruner is None:
        return True
    out = graph.is_out_channel_pruning_fn(dep.handler)
    if not out and multiplier(module):
        return False
    try:
        if isinstance(module, nn.Parameter):  # its pruner is shared: the dimension is the graph node's
            count = module.shape[dep.target.pruning_dim]
        else:
            count = pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
    except Exception:  # a pruner that cannot count this layer: Torch-Pruning's own checks decide
        return True
    # one channel is broadcast over the group's channels (a scalar gain), not one of them
    return not isinstance(count, int) or (count > 1 and max(int(i) for i in idxs) < count)


def multipliers_in(plan: Any) -> dict[nn.Module, int]:
    """The channel-multiplier convolutions a plan cuts, with their multipliers (before the cut)."""
    found: dict[nn.Module, int] = {}
    for dep, _ in plan:
        factor = multiplier(dep.target.module)
        if factor:
            found[dep.target.module] = factor
    return found


def settle(found: dict[nn.Module, int]) -> None:
    """After a cut of their output channels, the convolutions ``found`` take the input and group counts
    those outputs imply."""
    for module, factor in found.items():
        conv: Any = module
        conv.in_channels = conv.groups = conv.out_channels // factor


def narrowest(
    graph: Any, group: Any, root: nn.Module, roots: tuple[type[nn.Module], ...], ignored: set[nn.Module]
) -> nn.Module | None:
    """Where ``group`` widens through a channel-multiplier convolution, the layer to list it from instead of
    ``root``: the one with the fewest output channels, so that a unit is one channel there and its ``m``
    copies beyond (listed from a wide layer, choosing one channel would take its siblings along unchosen).
    None where ``root`` is that layer already, or the group does not widen."""
    if not any(multiplier(dep.target.module) for dep, _ in group):
        return None
    best, fewest = root, graph.get_pruner_of_module(root).get_out_channels(root)
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, roots) and module not in ignored and graph.is_out_channel_pruning_fn(dep.handler):
            count = graph.get_pruner_of_module(module).get_out_channels(module)
            if isinstance(count, int) and count < fewest:
                best, fewest = module, count
    return None if best is root else best


def check_sound(graph: Any, plan: Any) -> bool:
    """Torch-Pruning's check of ``plan`` on its sound items only (a plan of heads keeps the others, which are cut
    by whole heads instead: counted as they are mapped, they would seem to take all of a layer's channels)."""
    items = plan._group
    plan._group = [item for item in items if _sound(graph, item.dep, item.idxs)]
    try:
        return bool(graph.check_pruning_group(plan))
    finally:
        plan._group = items
