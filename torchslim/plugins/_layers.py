"""Helpers shared by the built-in stages: choosing layers by type and name."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn


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


def select_layers(
    model: nn.Module, types: Sequence[str], exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer of one of ``types`` whose name matches no ``exclude`` pattern."""
    wanted = tuple(layer_type(t) for t in types)
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in wanted and not matches(name, exclude)
    ]


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


def has_weight(module: nn.Module) -> bool:
    """Whether the layer holds a plain ``weight`` tensor (quantized layers keep theirs packed)."""
    return isinstance(getattr(module, "weight", None), torch.Tensor)
