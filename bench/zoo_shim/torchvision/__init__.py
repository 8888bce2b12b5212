"""Import-only stand-in for torchvision, for bench/zoo.py only (see docs/zoo.md). Not a torchvision."""

from . import datasets, ops, transforms  # noqa: F401
from ._stub import module_getattr

__version__ = "0.0.0+zoo-shim"
__getattr__ = module_getattr("torchvision")
