"""Helpers shared by the built-in stages: choosing layers by type and name."""

from __future__ import annotations

import difflib
import fnmatch
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.errors import StageError


def layer_type(name: str) -> type[nn.Module]:
    """``"Linear"`` -> ``torch.nn.Linear``; ValueError (a validation error) if it is no torch.nn layer."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"'{name}' is not a layer type of torch.nn (e.g. Linear, Conv2d)")
    return cls


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether the layer name ``name`` matches one of the fnmatch ``patterns`` (``classifier``, ``blocks.*.conv1``).

    Case-sensitive on every platform: layer names are Python attribute paths. The one name matcher
    of the built-in stages, so that ``exclude`` means the same everywhere.
    """
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_layers(model: nn.Module, types: Sequence[str], exclude: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer of one of ``types`` (or of a user's subclass of one) whose
    name matches no ``exclude`` pattern."""
    wanted = tuple(layer_type(t) for t in types)
    return [
        (name, module) for name, module in model.named_modules() if is_layer_of(module, wanted) and not matches(name, exclude)
    ]


def is_layer_of(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``module`` is one of ``types`` or a subclass of one defined outside torch (``class Head(nn.Linear)``).

    torch's (and torchao's) own subclasses are other layers, not the user's: QAT and reference layers, and the
    ``NonDynamicallyQuantizableLinear`` inside MultiheadAttention, which torch will not quantize.
    """
    kind = type(module)
    return kind in types or (issubclass(kind, types) and not kind.__module__.startswith(("torch.", "torchao.")))


def check_patterns(model: nn.Module, patterns: Sequence[str], option: str, stage: str) -> None:
    """StageError (naming ``stage`` and ``option``) for the first name pattern that matches no module of
    ``model``, with the close names; a pattern that matches nothing is almost always a typo."""
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise StageError(stage, f"{option}: pattern '{pattern}' matches no layer of the model; {_nearby(pattern, names)}")


def _nearby(pattern: str, names: list[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    if close:
        return "close names: " + ", ".join(close)
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"the layers are named like: {shown or 'none (the model has no submodules)'}"


def layer_census(model: nn.Module) -> str:
    """A short ``Type xN`` list of the model's leaf layers, for error messages."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if not any(True for _ in module.children()):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "none"


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's ``weight`` tensor; TypeError if it has none (filter with :func:`has_weight` first)."""
    value = getattr(module, "weight", None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return value


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """The layer's ``bias`` tensor, or None when it has none (``bias=False``, or no such attribute)."""
    value = getattr(module, "bias", None)
    return value if isinstance(value, torch.Tensor) else None


def has_weight(module: nn.Module) -> bool:
    """Whether the layer holds a plain ``weight`` tensor (quantized layers keep theirs packed)."""
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def feed_inputs(
    model: nn.Module,
    layers: Iterable[nn.Module],
    batches: Iterable[torch.Tensor],
    take: Callable[[nn.Module, torch.Tensor], None],
) -> None:
    """Run the batches through ``model`` (no gradients) with ``take(layer, its first input)`` called at
    every forward of each of ``layers``. Raises ValueError if no batch came."""

    def hook(layer: nn.Module, inputs: tuple[Any, ...], _: Any) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            take(layer, inputs[0].detach())

    handles = [layer.register_forward_hook(hook) for layer in layers]
    # a model of packed low-bit layers holds buffers only
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    seen = 0
    try:
        with torch.no_grad():
            for inputs in batches:
                model(inputs if tensor is None else inputs.to(tensor.device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError("the calibration data yielded no batch")
