"""Structured pruning of layers Torch-Pruning does not fully know.

Two mechanisms, neither tied to an architecture:

- **Tensors the pruner did not touch.** Torch-Pruning's pruner for a Conv2d cuts ``weight`` and ``bias``;
  a subclass with a tensor of its own per output channel (a learned gain of shape ``(out, 1, 1, 1)``, as
  weight-standardized convolutions have) keeps it whole, and the layer's forward fails. After each cut,
  :func:`prune_plan` slices every parameter and buffer of a cut layer that still has the layer's old
  channel count where PyTorch puts it: the leading dimension for output channels; for input channels,
  the one dimension of that size, where the layer's input and output counts differ (else it is left
  alone, and the forward check that follows the cut undoes a cut it broke).
- **Layers of your own** (the ``layer_pruners`` option): a :class:`LayerPruner` says how many channels a
  layer type has and keeps the chosen ones; it is given to Torch-Pruning as a customized pruner, and
  the layer type roots groups of channels like Conv and Linear layers do.

A pruner that cuts every tensor of its layer itself says so (``CUTS_ALL_TENSORS``): the leftovers rule is not
applied to its layer, whose other tensors can share a channel count by chance (an LSTM's hidden weights have
``4 * hidden_size`` rows, as many as its input features, say).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import _structured_slices as slices
from ._structured_repair import multipliers_in, settle


@runtime_checkable
class LayerPruner(Protocol):
    """How structured pruning cuts the channels of a layer type Torch-Pruning does not know.

    Name a class implementing it, with the layer type, in the ``layer_pruners`` option of
    ``method: structured`` (``{"mypackage.layers:GainConv": "mypackage.pruning:GainConvPruner"}``);
    it is built with no arguments. ``keep_out``/``keep_in`` receive the sorted indices of the channels
    that stay, and must leave the layer consistent (its tensors and its size attributes).
    """

    def out_channels(self, layer: nn.Module) -> int:
        """The layer's output channels."""
        ...

    def in_channels(self, layer: nn.Module) -> int:
        """The layer's input channels."""
        ...

    def keep_out(self, layer: nn.Module, kept: torch.Tensor) -> None:
        """Keep only the output channels ``kept``."""
        ...

    def keep_in(self, layer: nn.Module, kept: torch.Tensor) -> None:
        """Keep only the input channels ``kept``."""
        ...


def customized(pruners: Mapping[type, LayerPruner]) -> dict[type, Any]:
    """Torch-Pruning customized pruners (its ``customized_pruners``) doing what ``pruners`` say."""
    return {layer_type: _adapted(pruner) for layer_type, pruner in pruners.items()}


def _adapted(pruner: LayerPruner) -> Any:
    import torch_pruning as tp

    class Adapted(tp.pruner.function.BasePruningFunc):  # type: ignore[misc]
        TARGET_MODULES = None
        CUTS_ALL_TENSORS = True  # keep_out/keep_in leave the layer consistent (LayerPruner's contract)

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            pruner.keep_out(layer, _kept(pruner.out_channels(layer), idxs))
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            pruner.keep_in(layer, _kept(pruner.in_channels(layer), idxs))
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return int(pruner.out_channels(layer))

        def get_in_channels(self, layer: nn.Module) -> int:
            return int(pruner.in_channels(layer))

    return Adapted()


def _kept(count: int, removed: Sequence[int]) -> torch.Tensor:
    gone = {int(i) for i in removed}
    return torch.tensor([i for i in range(count) if i not in gone], dtype=torch.long)


def keep(module: nn.Module, key: str, dim: int, kept: torch.Tensor) -> None:
    """Replace ``module``'s own parameter or buffer ``key`` by its ``kept`` indices along ``dim``."""
    parameter = module._parameters.get(key)
    tensor = parameter if parameter is not None else module._buffers[key]
    assert tensor is not None  # keep is called for the layer's own, present tensors
    sliced = torch.index_select(tensor.data, dim, kept.to(tensor.device)).clone()
    if parameter is not None:
        module._parameters[key] = nn.Parameter(sliced, requires_grad=parameter.requires_grad)
    else:
        module._buffers[key] = sliced


def prune_plan(graph: Any, plan: Any) -> None:
    """Run Torch-Pruning's ``plan``, then slice the cut layers' tensors its pruners left at the old count."""
    pending = [_Leftovers.before(graph, dep, idxs) for dep, idxs in plan]
    widening, splits = multipliers_in(plan), slices.pending(graph, plan)
    plan.prune()
    settle(widening)
    slices.resize(graph, splits)
    for leftovers in pending:
        if leftovers is not None:
            leftovers.slice()


class _Leftovers:
    """One cut layer's own tensors before the cut, to slice those the cut left at the old channel count."""

    def __init__(self, module: nn.Module, out: bool, counts: tuple[int, int], removed: Sequence[int]) -> None:
        self.module, self.out, self.counts = module, out, counts
        self.kept = _kept(counts[0] if out else counts[1], removed)
        self.tensors = {key: (t, tuple(t.shape)) for key, t in _own(module)}

    @classmethod
    def before(cls, graph: Any, dep: Any, idxs: Sequence[int]) -> _Leftovers | None:
        module = dep.target.module
        pruner = graph.get_pruner_of_module(module) if isinstance(module, nn.Module) else None
        if pruner is None or getattr(pruner, "CUTS_ALL_TENSORS", False):
            return None  # no pruner, or one that cuts every tensor of its layer itself
        out = bool(graph.is_out_channel_pruning_fn(dep.handler))
        counts = (pruner.get_out_channels(module), pruner.get_in_channels(module))
        if not all(isinstance(c, int) for c in counts):
            return None
        return cls(module, out, counts, idxs)

    def slice(self) -> None:
        old = self.counts[0] if self.out else self.counts[1]
        if len(self.kept) == old:
            return
        current = dict(_own(self.module))
        for key, (tensor, shape) in self.tensors.items():
            if current.get(key) is not tensor or tuple(tensor.shape) != shape:
                continue  # cut already (the pruner replaced or resized it)
            dim = self._dim(shape)
            if dim is not None:
                keep(self.module, key, dim, self.kept)

    def _dim(self, shape: tuple[int, ...]) -> int | None:
        """The dimension of ``shape`` holding the channels being cut, where it is not ambiguous."""
        out, inp = self.counts
        if self.out and shape and shape[0] == out:
            return 0
        count, other = (out, inp) if self.out else (inp, out)
        dims = [d for d, size in enumerate(shape) if size == count]
        if count == other or len(dims) != 1:
            return None
        return dims[0]


def _own(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The layer's own parameters and buffers (not its children's), floating point ones only."""
    tensors = list(module._parameters.items()) + list(module._buffers.items())
    return [(key, t) for key, t in tensors if t is not None and t.is_floating_point() and t.dim() > 0]


def resolved(spec: Mapping[str, str], load: Callable[[str, str], Any]) -> dict[type, LayerPruner]:
    """The ``layer_pruners`` option's ``"module:LayerClass": "module:PrunerClass"`` pairs, imported by
    ``load(target, field)`` and built; ValueError saying which pair is not a layer type and a LayerPruner."""
    pruners: dict[type, LayerPruner] = {}
    for layer_target, pruner_target in spec.items():
        layer_type = load(layer_target, f"layer_pruners: {layer_target}")
        if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
            raise ValueError(f"layer_pruners: '{layer_target}' is not an nn.Module class")
        pruner = load(pruner_target, f"layer_pruners: {pruner_target}")()
        if not isinstance(pruner, LayerPruner):
            raise ValueError(
                f"layer_pruners: '{pruner_target}' built a {type(pruner).__name__}, which lacks "
                "out_channels, in_channels, keep_out or keep_in (torchslim.plugins.prune.LayerPruner)"
            )
        pruners[layer_type] = pruner
    return pruners
