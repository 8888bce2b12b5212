"""Layers the example inputs do not reach: a forward that branches on its data (``if x.mean() > 0.3:``).

Torch-Pruning builds its dependency graph from one forward on the example inputs, so a layer on a branch that
forward did not take is not in the graph: the layers feeding it lose channels, it keeps reading the old count,
and the first input that takes its branch fails (after the cut, an input can take a branch no input took before).

:func:`find_reach` finds the layers with weights that did not run on the example (forward hooks) and searches the
calibration batches for inputs that reach them; the graph is traced on the example and those inputs together (one
forward each, every output joined), and every cut's forward check runs on them too. A layer that no input reaches
is *probed*: the topmost module holding only such layers is called on every tensor of the traced forward that its
first layer fits (a Conv's or Linear's input width), and its output is added to every tensor of the forward of its
shape, so that the graph couples its input and output channels to every place they could come from and go to
(conservative: fewer channels go there); every cut is then checked to leave it a tensor it fits. A module whose
first layer is neither a Conv nor a Linear, or that fits no tensor, cannot be probed: a note names it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Reach:
    """What the example inputs do not reach, and how the graph and the cut checks reach it anyway."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    """Calibration batches, each reaching at least one layer that neither the example nor an earlier one did."""
    unreached: dict[str, nn.Module] = field(default_factory=dict)
    """Topmost modules whose layers with weights ran on none of those inputs (by name): probed."""
    searched: int = 0
    """Calibration batches run while searching."""
    probed: set[str] = field(default_factory=set)
    """Unreached modules that fit some tensor of the traced forward (the others are not in the graph)."""
    joins: set[Any] = field(default_factory=set)
    """Autograd nodes of the probes' outputs joined to the forward's tensors: graph outputs that are not the model's."""

    def forward(self, model: nn.Module, example: Any) -> list[Any]:
        """Torch-Pruning's ``forward_fn``: the model's outputs on the example and :attr:`inputs`, then the probes'."""
        self.joins.clear()
        output, tensors = _recorded(model, example)
        outputs = [output, *(model(x) for x in self.inputs)]
        for name, module in self.unreached.items():
            for probe in _probes(module, tensors):
                self.probed.add(name)
                joined = [probe + t for t in tensors if t.shape == probe.shape]
                self.joins.update(j.grad_fn for j in joined)
                outputs.extend(joined or [probe])  # joined to nothing: its output channels stay (a model output)
        return outputs

    def check(self, model: nn.Module, example: Any) -> list[Any]:
        """The model's outputs on the example and :attr:`inputs`; RuntimeError if a probed module fits no tensor
        of the forward any more (a cut gave its inputs fewer channels than it reads)."""
        output, tensors = _recorded(model, example)
        for name in self.probed:
            if not any(True for _ in _probes(self.unreached[name], tensors)):
                raise RuntimeError(f"{name}, on a branch no input took, no longer fits any tensor of the forward")
        return [output, *(model(x) for x in self.inputs)]

    def notes(self) -> list[str]:
        """What the stage's summary says about the layers no input reached (nothing when every layer ran)."""
        source = f"neither on the example inputs nor on {self.searched} calibration batch(es)"
        notes = []
        if self.probed:
            notes.append(
                f"{_names(sorted(self.probed))} ran {source} (a branch no input took): their channels were "
                "coupled to every tensor of the forward they fit, and each cut checked against them"
            )
        lost = sorted(set(self.unreached) - self.probed)
        if lost:
            notes.append(
                f"{_names(lost)} ran {source}, and fit no tensor of the forward (or start with a layer that "
                "is neither a Conv nor a Linear): the dependency graph does not hold them, so they were not "
                "pruned but the layers feeding them may have been, and an input that reaches them may fail; "
                "give calibration data that reaches them, or exclude the layers around them"
            )
        return notes


def find_reach(model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor]) -> Reach:
    """The calibration ``batches`` (read lazily, only while a layer is still unreached) that reach layers with
    weights the ``example`` does not, and the topmost modules of the layers none of them reach."""
    layers = [module for module in model.modules() if _has_weights(module)]
    ran = _ran(model, example, layers)
    found = Reach()
    if len(ran) == len(layers):
        return found
    for batch in batches:
        found.searched += 1
        new = _ran(model, batch, layers) - ran
        if new:
            found.inputs.append(batch)
            ran |= new
        if len(ran) == len(layers):
            return found
    found.unreached = _topmost(model, {layer for layer in layers if layer not in ran})
    return found


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:6]) + (f", +{len(names) - 6} more" if len(names) > 6 else "")
    return f"{len(names)} module(s) ({shown})"


def _has_weights(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def _topmost(model: nn.Module, unreached: set[nn.Module]) -> dict[str, nn.Module]:
    """The largest modules (not the model) whose layers with weights are all in ``unreached``, by name."""
    whole = {
        name: module
        for name, module in model.named_modules()
        if name and _weighted(module) and all(m in unreached for m in _weighted(module))
    }
    return {name: module for name, module in whole.items() if name.rpartition(".")[0] not in whole}


def _weighted(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if _has_weights(m)]


def _ran(model: nn.Module, inputs: torch.Tensor, layers: list[nn.Module]) -> set[nn.Module]:
    """Which of ``layers`` run in ``model``'s forward on ``inputs``, or have their weights computed with (a model
    that calls ``F.linear(x, self.qkv.weight)`` reaches ``qkv`` without calling it: the graph holds its weight)."""
    ran: set[nn.Module] = set()
    with _hooked(layers, lambda module, args: ran.add(module), pre=True), torch.enable_grad():
        used = _leaves(model(inputs))
    return ran | {layer for layer in layers if any(id(p) in used for p in layer._parameters.values())}


def _leaves(output: Any) -> set[int]:
    """Ids of the tensors (weights) at the leaves of ``output``'s autograd graph."""
    stack = [t.grad_fn for t in _flat(output) if t.grad_fn is not None]
    seen: set[Any] = set()
    leaves: set[int] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return leaves


def _flat(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else []
    return [t for value in values for t in _flat(value)]


def _recorded(model: nn.Module, example: Any) -> tuple[Any, list[torch.Tensor]]:
    """The model's output on ``example`` and every floating-point tensor its modules output on the way (once each)."""
    tensors: dict[int, torch.Tensor] = {}

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() >= 2:
            tensors.setdefault(id(output), output)

    with _hooked(list(model.modules()), keep, pre=False):
        output = model(example)
    return output, list(tensors.values())


def _probes(module: nn.Module, tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``module``'s outputs on each of ``tensors`` that its first layer fits (and that it runs on)."""
    first = next((m for m in module.modules() if _has_weights(m)), None)
    for tensor in tensors:
        if first is None or not _fits(first, tensor):
            continue
        try:
            output = module(tensor)
        except Exception:  # fitting the first layer's width is no promise that the rest runs
            continue
        if isinstance(output, torch.Tensor):
            yield output


def _fits(layer: nn.Module, tensor: torch.Tensor) -> bool:
    if isinstance(layer, nn.modules.conv._ConvNd):
        return tensor.dim() == len(layer.kernel_size) + 2 and tensor.shape[1] == layer.in_channels
    if isinstance(layer, nn.Linear):
        return tensor.shape[-1] == layer.in_features
    return False


@contextmanager
def _hooked(layers: list[nn.Module], hook: Any, pre: bool) -> Iterator[None]:
    handles = [layer.register_forward_pre_hook(hook) if pre else layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
