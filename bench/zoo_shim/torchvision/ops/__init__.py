from .._stub import module_getattr
from . import misc  # noqa: F401

__getattr__ = module_getattr("torchvision.ops")
