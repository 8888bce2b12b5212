"""Placeholders for the torchvision names timm imports at import time (see docs/zoo.md).

Every placeholder is a class that can be imported, subclassed and used in ``isinstance`` checks, but
raises as soon as it is built or called: the zoo's architectures never use torchvision at run time,
and if one did, the error says so instead of computing something wrong.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class ShimError(RuntimeError):
    """A torchvision feature was used through the zoo's import-only stand-in."""


def _refuse(qualname: str) -> ShimError:
    return ShimError(
        f"{qualname} is a stand-in from bench/zoo_shim (torchvision is not installed beside the "
        f"CPU torch here); the zoo's architectures must not use it at run time"
    )


def placeholder(module: str, name: str, base: type = object) -> type:
    qualname = f"{module}.{name}"

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise _refuse(qualname)

    def __call__(*args: Any, **kwargs: Any) -> None:
        raise _refuse(qualname)

    cls = type(name, (base,), {"__init__": __init__, "__module__": module, "__doc__": f"Stand-in for {qualname}."})
    return cls


def module_getattr(module: str):
    """A module-level ``__getattr__`` that hands out placeholders for any public name."""
    cache: dict[str, type] = {}

    def __getattr__(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in cache:
            cache[name] = placeholder(module, name)
        return cache[name]

    return __getattr__


class FrozenBatchNorm2dStub(nn.Module):
    """Stand-in for torchvision.ops.misc.FrozenBatchNorm2d: isinstance checks are False, building raises."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse("torchvision.ops.misc.FrozenBatchNorm2d")
