"""Built-in ``quantize`` stage family: int8 dynamic and static quantization, int8 embeddings, half
precision, one config class (and one module) per method.

Every method swaps in layers with real low-precision kernels. The quantization libraries sit
behind backends: ``_quant_ao`` (the deprecated ``torch.ao.quantization``: dynamic, FX static),
``_quant_torchao`` (torchao's PT2E flow) and ``_quant_modules`` (plain torch: int8 embeddings,
half precision). A new method is a module with a subclass of :class:`QuantizeStage` (or of
:class:`LayerQuantize`, for one that quantizes chosen layers), listed in ``methods`` below.
"""

from __future__ import annotations

from .base import LayerQuantize, QuantizeStage
from .binary import BinaryQuantize
from .dynamic import DynamicQuantize
from .float8 import Float8Quantize
from .half import HalfQuantize
from .kbit import KbitQuantize
from .nncf import NncfQuantize
from .ort import OrtDynamicQuantize, OrtStaticQuantize
from .static import StaticQuantize
from .ternary import TernaryQuantize
from .weight_only import WeightOnlyQuantize

QuantizeStage.methods = (DynamicQuantize, StaticQuantize, WeightOnlyQuantize, HalfQuantize,
                         BinaryQuantize, TernaryQuantize, KbitQuantize, Float8Quantize,
                         OrtStaticQuantize, OrtDynamicQuantize, NncfQuantize)

__all__ = ["BinaryQuantize", "DynamicQuantize", "Float8Quantize", "HalfQuantize", "KbitQuantize", "LayerQuantize",
           "QuantizeStage", "StaticQuantize", "TernaryQuantize", "WeightOnlyQuantize"]
