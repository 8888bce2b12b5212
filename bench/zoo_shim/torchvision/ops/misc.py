from .._stub import FrozenBatchNorm2dStub as FrozenBatchNorm2d  # noqa: F401
from .._stub import module_getattr

__getattr__ = module_getattr("torchvision.ops.misc")
