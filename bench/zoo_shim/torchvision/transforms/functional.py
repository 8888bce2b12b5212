from enum import Enum

from .._stub import module_getattr


class InterpolationMode(Enum):
    """Same members and values as torchvision's: timm builds lookup tables from it at import time."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


__getattr__ = module_getattr("torchvision.transforms.functional")
