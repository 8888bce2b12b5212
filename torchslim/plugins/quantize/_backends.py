"""What every quantization backend shares: the backend interface, the layer census, torch's warnings.

A backend turns a float model into a quantized one (``quantize``) and, when a saved model
is loaded, rebuilds the same quantized structure on a fresh float model from the plain-data
record ``quantize`` returned (``restore``), so that the saved state dict fits it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .._layers import matches

#: Layer types with weights that static quantization (FX and torchao alike) converts to int8 kernels.
STATIC_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
#: Module namespaces of torch's quantized layers (static, dynamic, fused).
TORCH_QUANTIZED = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")


class BackendError(Exception):
    """A backend cannot do what the stage asked (missing engine or package, untraceable model)."""


@dataclass(frozen=True)
class StaticOptions:
    """The stage options a static backend needs, as plain values."""

    backend: str
    modules: tuple[str, ...]
    exclude: tuple[str, ...]
    keep_float: tuple[str, ...] = ()
    """Layers left float besides ``exclude``, opaque to tracing: the user's subclasses of the
    ``modules`` types whose forward is not their base class's (see :mod:`._quant_subclass`)."""


@dataclass
class Quantized:
    """A backend's result: the model, the record restore needs, what was (not) quantized, and
    notes on how (e.g. eager mode because FX could not trace the model)."""

    model: nn.Module
    record: dict[str, Any]
    census: Census
    notes: list[str] = field(default_factory=list)


class StaticBackend(Protocol):
    """Post-training static quantization with calibration: one implementation per ``backend`` option."""

    def quantize(
        self, model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor], options: StaticOptions
    ) -> Quantized:
        """Calibrate on ``batches`` and return the quantized model."""

    def restore(self, model: nn.Module, options: StaticOptions, record: Mapping[str, Any]) -> nn.Module:
        """Rebuild the quantized structure on a fresh float ``model`` (values come from the state dict)."""


@dataclass
class Census:
    """Which layers ended up quantized and which hold float weights still, by name and type."""

    quantized: dict[str, str] = field(default_factory=dict)
    left_float: dict[str, str] = field(default_factory=dict)

    def summary(self, verb: str = "quantized", limit: int = 6) -> str:
        """``quantized Conv2d x9, Linear x1; left float: LayerNorm x2 (a.norm, b.norm)``."""
        text = f"{verb} {_counts(self.quantized) or 'nothing'}; left float: "
        if not self.left_float:
            return text + "none"
        names = list(self.left_float)
        more = f", +{len(names) - limit} more" if len(names) > limit else ""
        return text + f"{_counts(self.left_float)} ({', '.join(names[:limit])}{more})"


def _counts(layers: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for kind in layers.values():
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items())


def take_census(
    types_before: Mapping[str, str], model: nn.Module, is_quantized: Callable[[nn.Module], bool], prefix: str = ""
) -> Census:
    """Classify ``model``'s layers: quantized ones (named by their float type before, ``types_before``)
    and layers that still hold float weights. ``prefix`` is a wrapper's path to strip from names."""
    census = Census()
    inside: list[str] = []
    for path, module in model.named_modules():
        name = path.removeprefix(prefix)
        if any(path.startswith(p + ".") for p in inside):
            continue  # part of a quantized layer (its packed parameters, its float bias)
        if is_quantized(module):
            census.quantized[name] = types_before.get(name, type(module).__name__)
            inside.append(path)
        elif any(p.is_floating_point() for p in module.parameters(recurse=False)):
            census.left_float[name] = type(module).__name__
    return census


def excluded_names(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of ``model``'s modules that match one of the fnmatch ``patterns`` (a backend's exclusions)."""
    patterns = tuple(patterns)
    return [name for name, _ in model.named_modules() if name and matches(name, patterns)]


def module_types(model: nn.Module) -> dict[str, str]:
    """``{name: type name}`` of every module, taken before a backend changes them."""
    return {name: type(module).__name__ for name, module in model.named_modules()}


def is_torch_quantized(module: nn.Module) -> bool:
    """True for torch's quantized layers (static, dynamic, fused), whatever their torch version path,
    and torchslim's subclasses of them."""
    return any(cls.__module__.startswith(TORCH_QUANTIZED) for cls in type(module).__mro__)


@dataclass
class TorchWarnings:
    """Warnings torch raised while quantizing, kept to be reported once instead of at every call."""

    deprecations: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


@contextmanager
def torch_warnings() -> Iterator[TorchWarnings]:
    """Collect the warnings torch and torchao raise in the block (one entry per distinct message);
    warnings from any other code (the user's model) are passed on unchanged."""
    seen = TorchWarnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    for item in caught:
        if not _from_torch(item.filename):
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
            continue
        first = str(item.message).strip().splitlines()[0] if str(item.message).strip() else item.category.__name__
        bucket = seen.deprecations if issubclass(item.category, (DeprecationWarning, FutureWarning)) else seen.others
        if first not in bucket:
            bucket.append(first)


def _from_torch(filename: str) -> bool:
    # torch's deprecation warnings point (stacklevel) at the line that called torch: this package's backends.
    path = filename.replace("\\", "/")
    return any(part in path for part in ("/torch/", "/torchao/", "/torchslim/plugins/quantize/_"))
