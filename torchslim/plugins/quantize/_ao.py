"""The only module that uses ``torch.ao.quantization``: dynamic quantization and static PTQ (FX graph
mode, or eager mode layer by layer where FX fails).

torch 2.13 marks ``torch.ao.quantization`` as deprecated (its successor is torchao); keeping
every call here means one file to replace when it goes. Callers wrap these functions in
:func:`torchslim.plugins.quantize._backends.torch_warnings`, which reports torch's warnings once.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ...engine.errors import first_line
from ._ao_eager import Int8Layer, bypassed_wrapped, eager_convert, eager_note, eager_prepare
from ._backends import (
    STATIC_TYPES,
    BackendError,
    Quantized,
    StaticOptions,
    excluded_names,
    is_torch_quantized,
    module_types,
    take_census,
)
from ._identity import ReadableWeights, bypassed_note, readable


def quantize_dynamic(
    model: nn.Module,
    types: Iterable[str],
    dtype: str,
    exclude: Iterable[str],
    per_channel: bool = True,
    reduce_range: bool = True,
) -> nn.Module:
    """torch's dynamic quantization of the layers of ``types`` (torch.nn names), except ``exclude`` patterns.

    int8 weights get one scale per output channel (``per_channel``) or one per tensor; the
    int8 kernels run at the same speed either way, and a scale per channel keeps rows with small
    weights from being rounded to a few levels (all-MiniLM-L6-v2: cosine 0.946 -> 0.977).
    ``reduce_range=False`` quantizes the Linear layers' activations to 8 bits instead of the 7 torch
    always uses (MiniLM: 0.977 -> 0.993): see :class:`FullRangeDynamicLinear`.
    """
    qconfig = _dynamic_qconfig(dtype, per_channel)
    spec: dict[Any, Any] = {getattr(nn, name): qconfig for name in types}
    spec.update({name: None for name in excluded_names(model, exclude)})
    return _dynamic(model, spec, dtype, reduce_range)


def quantize_dynamic_layer(
    model: nn.Module, name: str, dtype: str, per_channel: bool = True, reduce_range: bool = True
) -> nn.Module:
    """A copy of ``model`` with only the layer called ``name`` dynamically quantized."""
    return _dynamic(model, {name: _dynamic_qconfig(dtype, per_channel)}, dtype, reduce_range)


def _dynamic(model: nn.Module, spec: Mapping[Any, Any], dtype: str, reduce_range: bool) -> nn.Module:
    from ._ao_rnn import savable

    quantized: nn.Module = torch.ao.quantization.quantize_dynamic(model.eval(), dict(spec), dtype=getattr(torch, dtype))
    # torch's recurrent layers put TorchScript objects in the state dict, which a weights_only load refuses.
    savable(quantized)
    # Layers that read as their float selves (_identity): model code reading fc.weight keeps working.
    return readable(quantized if reduce_range else full_range(quantized), is_torch_quantized)


class FullRangeDynamicLinear(ReadableWeights, torch.ao.nn.quantized.dynamic.Linear):
    """torch's dynamic int8 Linear with its inputs quantized to 8 bits, not 7.

    torch's module (version 4) always passes ``reduce_range=True``: it keeps the AVX2 kernels' pairwise
    u8 x s8 products from saturating 16 bits, at the cost of one bit of every activation. The
    VNNI kernels accumulate in 32 bits and need no such margin; the weights and packing are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 matmul with 8-bit dynamic activations (int8 weights only: float16 never gets here)."""
        out: torch.Tensor = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
        return out.to(x.dtype)


def full_range(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with each int8 dynamic Linear turned into a :class:`FullRangeDynamicLinear`."""
    for module in model.modules():
        if type(module) is torch.ao.nn.quantized.dynamic.Linear and module._packed_params.dtype == torch.qint8:
            module.__class__ = FullRangeDynamicLinear
    return model


def _dynamic_qconfig(dtype: str, per_channel: bool) -> Any:
    from torch.ao.quantization import default_dynamic_qconfig, float16_dynamic_qconfig, per_channel_dynamic_qconfig

    if dtype == "float16":
        return float16_dynamic_qconfig
    return per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig


class FxFailed(BackendError):
    """FX graph mode could not quantize the model (tracing, calibration or the converted forward failed)."""


class FxBackend:
    """Static int8 through FX graph mode (``prepare_fx`` / ``convert_fx``), or layer by layer in eager
    mode for a model FX cannot trace or whose converted graph does not run.

    In FX mode Conv/Linear are fused with their BatchNorm and ReLU neighbours; the ``x86`` qconfig
    quantizes weights per output channel, ``qnnpack`` per tensor.
    """

    def quantize(
        self, model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor], options: StaticOptions
    ) -> Quantized:
        """Trace, fuse, insert observers, run the calibration batches, convert to int8 modules; in eager
        mode (with a note that says why) if FX fails. ``batches`` must be iterable twice."""
        before = module_types(model)
        example = example[:1]
        record: dict[str, Any] = {
            "example_shape": list(example.shape),
            "example_dtype": str(example.dtype).removeprefix("torch."),
        }
        try:
            converted = self._fx(copy.deepcopy(model), example, batches, options)
        except FxFailed as exc:
            return self._eager(copy.deepcopy(model), batches, options, exc, record)
        return Quantized(converted, record, take_census(before, converted, is_torch_quantized))

    def restore(self, model: nn.Module, options: StaticOptions, record: Mapping[str, Any]) -> nn.Module:
        """Redo tracing (or wrapping), fusion and conversion without calibration: the saved state dict
        holds every scale and zero point (modules' and the graph's own quantize nodes')."""
        if record.get("mode") == "eager":
            options = replace(options, keep_float=(*options.keep_float, *record.get("bypassed", [])))
            return eager_convert(eager_prepare(model, options))
        example = torch.zeros(record["example_shape"], dtype=getattr(torch, record["example_dtype"]))
        return self._convert(self._prepare(model, example, options))

    def _fx(self, model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor], options: StaticOptions) -> nn.Module:
        prepared = self._prepare(model, example, options)
        try:
            # A failing GraphModule prints its generated code to stderr before raising; the failure
            # is reported once, in the eager fallback's note or in the stage's error.
            with contextlib.redirect_stderr(io.StringIO()):
                _calibrate(prepared, batches)
                converted = self._convert(prepared)
                with torch.no_grad():
                    converted(example)  # a converted graph can fail where the float one ran
        except BackendError:
            raise
        except Exception as exc:  # the user's forward, replayed as a graph, can fail in any way
            raise FxFailed(f"torch.fx's quantized graph failed ({first_line(exc, typed=True)})") from exc
        return converted

    def _eager(
        self,
        model: nn.Module,
        batches: Iterable[torch.Tensor],
        options: StaticOptions,
        fx_error: FxFailed,
        record: dict[str, Any],
    ) -> Quantized:
        """Layer by layer; the layers the model bypasses (it computes with their weights) stay float, named in
        the record and a note."""
        before = module_types(model)
        try:
            bypassed = bypassed_wrapped(model, options, next(iter(batches), None))
            prepared = eager_prepare(model, replace(options, keep_float=(*options.keep_float, *bypassed)))
            _calibrate(prepared, batches)
            converted = eager_convert(prepared)
        except BackendError:
            raise
        except Exception as exc:  # as in _fx: the user's forward
            raise BackendError(f"{fx_error}; eager mode, layer by layer, failed too ({first_line(exc, typed=True)})") from exc
        record.update({"mode": "eager", **({"bypassed": bypassed} if bypassed else {})})
        census = take_census(before, converted, lambda m: isinstance(m, Int8Layer))
        return Quantized(converted, record, census, [eager_note(fx_error), *([bypassed_note(bypassed)] if bypassed else [])])

    def _prepare(self, model: nn.Module, example: torch.Tensor, options: StaticOptions) -> nn.Module:
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.quantize_fx import prepare_fx

        select_engine(options.backend)
        # Tracing into a subclass layer left float would quantize its functional ops (see _qconfig_mapping).
        custom = PrepareCustomConfig().set_non_traceable_module_names(list(options.keep_float))
        try:
            prepared: nn.Module = prepare_fx(model.eval(), _qconfig_mapping(model, options), (example,), custom)
        except Exception as exc:  # symbolic tracing raises TraceError, TypeError, NotImplementedError...
            raise FxFailed(f"torch.fx could not trace the model ({first_line(exc, typed=True)})") from exc
        return prepared

    def _convert(self, prepared: nn.Module) -> nn.Module:
        from torch.ao.quantization.quantize_fx import convert_fx

        converted: torch.fx.GraphModule = convert_fx(prepared)  # type: ignore[arg-type]
        _reshape_views(converted)
        # A graph that reads fc.weight.device keeps working (_identity). A layer the graph only reads (F.linear
        # with its weight) is no call_module of the graph and stays float: FX needs no bypass check.
        readable(converted, is_torch_quantized)
        return converted.eval()


def _calibrate(prepared: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Run the calibration batches through the observers; BackendError if there is none."""
    seen = 0
    with torch.no_grad():
        for inputs in batches:
            prepared(inputs)
            seen += 1
    if not seen:
        raise BackendError("calibration: the calibration data yielded no batch")


def _reshape_views(graph: torch.fx.GraphModule) -> None:
    """Turn the graph's ``x.view(shape)`` calls into ``x.reshape(shape)``.

    int8 convolutions hand back channels-last tensors, on which the ``x.view(x.size(0), -1)`` that
    follows so many CNNs' last pooling fails; ``reshape`` is the same view where one exists and a
    copy where not. Views to another dtype have no reshape and are left alone.
    """
    changed = False
    for node in graph.graph.nodes:
        if node.op == "call_method" and node.target == "view" and not _dtype_view(node):
            node.target = "reshape"
            changed = True
    if changed:
        graph.recompile()


def _dtype_view(node: torch.fx.Node) -> bool:
    return any(isinstance(arg, torch.dtype) for arg in (*node.args[1:], *node.kwargs.values()))


def _qconfig_mapping(model: nn.Module, options: StaticOptions) -> Any:
    import torch.nn.functional as F
    from torch.ao.quantization import get_default_qconfig_mapping

    mapping = get_default_qconfig_mapping(options.backend)
    for name in STATIC_TYPES:
        if name not in options.modules:
            mapping.set_object_type(getattr(nn, name), None)
    # A functional linear/conv's int8 weights become a packed ScriptObject attribute of the graph,
    # which a weights_only state dict cannot hold: the saved model could not be loaded again.
    for function in (F.linear, F.conv1d, F.conv2d, F.conv3d):
        mapping.set_object_type(function, None)
    for name in [*excluded_names(model, options.exclude), *options.keep_float]:
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
