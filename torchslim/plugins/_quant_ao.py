"""The only module that uses ``torch.ao.quantization``: dynamic quantization and FX graph-mode static PTQ.

torch 2.13 marks ``torch.ao.quantization`` as deprecated (its successor is torchao); keeping
every call here means one file to replace when it goes. Callers wrap these functions in
:func:`torchslim.plugins._quant_base.torch_warnings`, which reports torch's warnings once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._quant_base import (
    STATIC_TYPES,
    BackendError,
    Quantized,
    StaticOptions,
    excluded_names,
    is_torch_quantized,
    module_types,
    take_census,
)


def quantize_dynamic(model: nn.Module, types: Iterable[str], dtype: str, exclude: Iterable[str],
                     per_channel: bool = True) -> nn.Module:
    """torch's dynamic quantization of the layers of ``types`` (torch.nn names), except ``exclude`` patterns.

    int8 weights get one scale per output channel (``per_channel``) or one per tensor; the
    int8 kernels run at the same speed either way, and a scale per channel keeps rows with small
    weights from being rounded to a few levels (all-MiniLM-L6-v2: cosine 0.977 against 0.946).
    """
    qconfig = _dynamic_qconfig(dtype, per_channel)
    spec: dict[Any, Any] = {getattr(nn, name): qconfig for name in types}
    spec.update({name: None for name in excluded_names(model, exclude)})
    quantized: nn.Module = torch.ao.quantization.quantize_dynamic(model.eval(), spec, dtype=getattr(torch, dtype))
    return quantized


def quantize_dynamic_layer(model: nn.Module, name: str, dtype: str, per_channel: bool = True) -> nn.Module:
    """A copy of ``model`` with only the layer called ``name`` dynamically quantized."""
    spec = {name: _dynamic_qconfig(dtype, per_channel)}
    quantized: nn.Module = torch.ao.quantization.quantize_dynamic(model.eval(), spec, dtype=getattr(torch, dtype))
    return quantized


def _dynamic_qconfig(dtype: str, per_channel: bool) -> Any:
    from torch.ao.quantization import default_dynamic_qconfig, float16_dynamic_qconfig, per_channel_dynamic_qconfig

    if dtype == "float16":
        return float16_dynamic_qconfig
    return per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig


class FxBackend:
    """Static int8 through FX graph mode (``prepare_fx`` / ``convert_fx``): needs no QuantStubs.

    Conv/Linear are fused with their BatchNorm and ReLU neighbours by ``prepare_fx``; the
    ``x86`` qconfig quantizes weights per output channel, ``qnnpack`` per tensor.
    """

    def quantize(self, model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor],
                 options: StaticOptions) -> Quantized:
        """Trace, fuse, insert observers, run the calibration batches, convert to int8 modules."""
        before = module_types(model)
        example = example[:1]
        prepared = self._prepare(copy.deepcopy(model), example, options)
        with torch.no_grad():
            seen = 0
            for inputs in batches:
                prepared(inputs)
                seen += 1
        if not seen:
            raise BackendError("calibration: the calibration data yielded no batch")
        converted = self._convert(prepared)
        record = {"example_shape": list(example.shape), "example_dtype": str(example.dtype).removeprefix("torch.")}
        return Quantized(converted, record, take_census(before, converted, is_torch_quantized))

    def restore(self, model: nn.Module, options: StaticOptions, record: Mapping[str, Any]) -> nn.Module:
        """Redo tracing, fusion and conversion without calibration: the saved state dict holds
        every scale and zero point (modules' and the graph's own quantize nodes')."""
        example = torch.zeros(record["example_shape"], dtype=getattr(torch, record["example_dtype"]))
        return self._convert(self._prepare(model, example, options))

    def _prepare(self, model: nn.Module, example: torch.Tensor, options: StaticOptions) -> nn.Module:
        from torch.ao.quantization.quantize_fx import prepare_fx

        select_engine(options.backend)
        try:
            prepared: nn.Module = prepare_fx(model.eval(), _qconfig_mapping(model, options), (example,))
        except Exception as exc:  # symbolic tracing raises TraceError, TypeError, NotImplementedError...
            raise BackendError(f"torch.fx could not trace the model ({type(exc).__name__}: {_first_line(exc)}); "
                               "static quantization needs a forward without Python control flow on tensor values; "
                               "use method dynamic, or make the forward traceable") from exc
        return prepared

    def _convert(self, prepared: nn.Module) -> nn.Module:
        from torch.ao.quantization.quantize_fx import convert_fx

        converted: nn.Module = convert_fx(prepared)  # type: ignore[arg-type]
        return converted.eval()


def _qconfig_mapping(model: nn.Module, options: StaticOptions) -> Any:
    from torch.ao.quantization import get_default_qconfig_mapping

    mapping = get_default_qconfig_mapping(options.backend)
    for name in STATIC_TYPES:
        if name not in options.modules:
            mapping.set_object_type(getattr(nn, name), None)
    for name in excluded_names(model, options.exclude):
        mapping.set_module_name(name, None)
    return mapping


#: torch's quantized engine when torchslim was imported (x86 on x86 CPUs, qnnpack on ARM): the
#: engine of a dynamic stage without ``backend``, whatever an earlier stage or recipe selected.
DEFAULT_ENGINE = torch.backends.quantized.engine


def select_engine(backend: str) -> None:
    """Make ``backend`` torch's quantized engine: packed int8 weights run on the engine that packed them."""
    engines = torch.backends.quantized.supported_engines
    if backend not in engines:
        raise BackendError(f"this torch build has no '{backend}' quantized engine (it has: {', '.join(engines)})")
    torch.backends.quantized.engine = backend


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
