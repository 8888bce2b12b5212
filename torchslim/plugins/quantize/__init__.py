"""Built-in ``quantize`` stage family, one config class (and one module) per method:

- in torch, int8: ``dynamic`` (weights int8, activations quantized per batch), ``static`` (calibrated
  activations), ``weight_only`` (int8 weights and embeddings); ``half`` (float16 / bfloat16 casts);
- in torch, packed low-bit layers: ``binary``, ``ternary``, ``kbit`` (2 to 8 bits), ``float8``;
- inside a deploy runtime (after a ``deploy`` stage): ``ort_static``, ``ort_dynamic`` (ONNX Runtime), ``nncf`` (OpenVINO).

Every method swaps in layers with real low-precision kernels. The quantization libraries sit behind
backends in this folder: ``_ao`` (the deprecated ``torch.ao.quantization``: dynamic, FX static; ``_ao_eager``
its layer-by-layer static fallback, ``_ao_rnn`` its recurrent layers saved as plain tensors),
``_torchao`` (torchao's PT2E flow), ``_modules`` (plain torch: int8 embeddings, half precision), and
the runtimes' own quantizers reached through :mod:`torchslim.plugins.deploy`. A new method is a module
with a subclass of :class:`QuantizeStage` (or of :class:`LayerQuantize`, for one that quantizes chosen
layers), listed in ``methods`` below.
"""

from __future__ import annotations

from torch import nn

from ._backends import is_torch_quantized
from .base import LayerQuantize, QuantizeStage
from .binary import BinaryQuantize
from .dynamic import DynamicQuantize
from .float8 import Float8Quantize
from .half import HalfQuantize
from .kbit import KbitQuantize
from .layers import LowBitLayer
from .nncf import NncfQuantize
from .ort import OrtDynamicQuantize, OrtStaticQuantize
from .static import StaticQuantize
from .ternary import TernaryQuantize
from .weight_only import WeightOnlyQuantize

QuantizeStage.methods = (
    DynamicQuantize,
    StaticQuantize,
    WeightOnlyQuantize,
    HalfQuantize,
    BinaryQuantize,
    TernaryQuantize,
    KbitQuantize,
    Float8Quantize,
    OrtStaticQuantize,
    OrtDynamicQuantize,
    NncfQuantize,
)


def is_quantized_layer(module: nn.Module) -> bool:
    """True for a layer quantized in torch: torch's quantized modules or torchslim's packed low-bit layers
    (neither exports to ONNX)."""
    return is_torch_quantized(module) or isinstance(module, LowBitLayer)


__all__ = [
    "BinaryQuantize",
    "DynamicQuantize",
    "Float8Quantize",
    "HalfQuantize",
    "KbitQuantize",
    "LayerQuantize",
    "NncfQuantize",
    "OrtDynamicQuantize",
    "OrtStaticQuantize",
    "QuantizeStage",
    "StaticQuantize",
    "TernaryQuantize",
    "WeightOnlyQuantize",
    "is_quantized_layer",
]
