"""Built-in ``quantize`` stage: int8 dynamic and static quantization, int8 embeddings, half precision.

Every method swaps in layers with real low-precision kernels (never simulated int8), reports
which layers it quantized and which it left float, and records what a saved model needs to
be loaded again. The quantization libraries sit behind backends: ``_quant_ao`` (the deprecated
``torch.ao.quantization``: dynamic, FX static), ``_quant_torchao`` (torchao's PT2E flow) and
``_quant_modules`` (plain torch: int8 embeddings, half precision).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from ..engine.errors import StageError
from ..engine.stage import Context, Stage
from ._layers import layer_census, layer_type, select_layers
from ._quant_base import (
    BackendError,
    Quantized,
    StaticBackend,
    StaticOptions,
    TorchWarnings,
    batch_inputs,
    is_torch_quantized,
    module_types,
    take_census,
    torch_warnings,
)

#: Layer types torch's dynamic quantization really converts. It accepts others (Conv2d)
#: and silently leaves them float, so anything else is refused at validation.
DYNAMIC_TYPES = ("Linear", "LSTM", "GRU", "LSTMCell", "GRUCell", "RNNCell")
STATIC_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
WEIGHT_ONLY_TYPES = ("Embedding",)
SUPPORTED = {"dynamic": DYNAMIC_TYPES, "static": STATIC_TYPES, "weight_only": WEIGHT_ONLY_TYPES}
#: Backends each method can run on (the first is the static default).
BACKENDS = {"static": ("x86", "qnnpack", "torchao"), "dynamic": ("x86", "onednn", "qnnpack")}
DTYPES = {"dynamic": ("qint8", "float16"), "static": ("qint8",), "weight_only": ("qint8",), "half": ("float16", "bfloat16")}
#: Options filled in per method when the recipe leaves them out.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dynamic": {"dtype": "qint8", "modules": ["Linear"]},
    "static": {"backend": "x86", "dtype": "qint8", "modules": list(STATIC_TYPES), "calibration_batches": 32},
    "weight_only": {"dtype": "qint8", "modules": ["Embedding"]},
    "half": {"dtype": "float16"},
}

Method = Literal["dynamic", "static", "weight_only", "half"]


class QuantizeStage(Stage):
    """Replace float layers by quantized ones with real int8 (or float16/bfloat16) kernels."""

    type: Literal["quantize"] = "quantize"
    method: Method = "dynamic"
    """``dynamic``: int8 weights, activations quantized on the fly (Linear, LSTM, GRU).
    ``static``: int8 weights and activations, calibrated on the calibration data (Conv, Linear,
    fused with their BatchNorm/ReLU). ``weight_only``: int8 embedding tables with a float
    scale per row. ``half``: the whole model cast to float16 or bfloat16."""
    backend: Literal["x86", "onednn", "qnnpack", "torchao"] | None = None
    """Static (default ``x86``): ``x86`` or ``qnnpack`` (ARM) run torch's FX graph-mode
    quantization; ``torchao`` runs torchao's PT2E flow with torch.compile (torchao must be installed).
    Dynamic (default: torch's default engine when torchslim was imported, ``x86`` on x86 CPUs):
    the engine that packs the int8 weights and so runs them, ``x86``, ``onednn`` or ``qnnpack``."""
    dtype: Literal["qint8", "float16", "bfloat16"] = "qint8"
    """Weight type: ``qint8`` (dynamic, static, weight_only) or ``float16`` (dynamic, half),
    ``bfloat16`` (half). Defaults to ``qint8``, or ``float16`` for half."""
    modules: list[str] | None = None
    """Layer types (torch.nn class names) to quantize. Defaults: dynamic ``[Linear]``; static
    ``[Linear, Conv1d, Conv2d, Conv3d]``; weight_only ``[Embedding]``. Not for half."""
    exclude: list[str] = Field(default_factory=list)
    """Layer name patterns (fnmatch, e.g. ``classifier``, ``stem.*``) left float. Not for half."""
    skip_sensitive: int | None = Field(default=None, ge=1)
    """Dynamic only: leave float the N layers whose int8 version, each quantized alone, moves the
    model's output most on the calibration data (mixed precision)."""
    calibration_batches: int | None = Field(default=None, ge=1)
    """Static (default 32): batches of the calibration data run through the observers. Dynamic
    with ``skip_sensitive`` (default 4): batches the layers' sensitivity is measured on."""
    granularity: Literal["per_channel", "per_tensor"] | None = None
    """Dynamic int8 only (default ``per_channel``): one weight scale per output channel, or one per
    layer (torch's own default). Same kernels and speed; per channel is more accurate."""

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        method = data.get("method", "dynamic") if isinstance(data, Mapping) else None
        if isinstance(method, str) and method in METHOD_DEFAULTS:
            return {**METHOD_DEFAULTS[method], **data}
        return data

    @field_validator("skip_sensitive")
    @classmethod
    def _dynamic_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        method = info.data.get("method")
        if value is not None and method not in (None, "dynamic"):
            raise ValueError(f"skip_sensitive applies to method dynamic only, not {method}")
        return value

    @field_validator("calibration_batches")
    @classmethod
    def _calibrated_only(cls, value: Any, info: ValidationInfo) -> Any:
        method = info.data.get("method")
        if value is None or method in (None, "static"):
            return value
        if method != "dynamic":
            raise ValueError(f"calibration_batches applies to method static only, not {method}")
        if info.data.get("skip_sensitive") is None:
            raise ValueError("calibration_batches applies to method dynamic only with skip_sensitive")
        return value

    @field_validator("backend")
    @classmethod
    def _backend_fits(cls, value: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("method")
        if value is None or method is None:
            return value
        if method not in BACKENDS:
            raise ValueError(f"backend applies to methods static and dynamic only, not {method}")
        if value not in BACKENDS[method]:
            raise ValueError(f"method {method} takes backend {', '.join(BACKENDS[method])}, not {value}")
        return value

    @field_validator("granularity")
    @classmethod
    def _dynamic_int8_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        method, dtype = info.data.get("method"), info.data.get("dtype")
        if value is not None and (method, dtype) != ("dynamic", "qint8"):
            raise ValueError(f"granularity applies to method dynamic with dtype qint8 only, not {method} with {dtype}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype_fits(cls, value: str, info: ValidationInfo) -> str:
        method = info.data.get("method")
        if method in DTYPES and value not in DTYPES[method]:
            raise ValueError(f"method {method} takes dtype {' or '.join(DTYPES[method])}, not {value}")
        return value

    @field_validator("modules")
    @classmethod
    def _supported(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        method = info.data.get("method")
        if value is None or method is None:
            return value
        if method == "half":
            raise ValueError("method half casts the whole model; modules does not apply")
        if not value:
            raise ValueError("name at least one layer type")
        for name in value:
            layer_type(name)
            if name not in SUPPORTED[method]:
                raise ValueError(f"{method} quantization cannot quantize {name}"
                                 f"{' (torch would leave it float)' if method == 'dynamic' else ''}; "
                                 f"supported: {', '.join(SUPPORTED[method])}")
        return value

    @field_validator("exclude")
    @classmethod
    def _not_half(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and info.data.get("method") == "half":
            raise ValueError("method half casts the whole model; exclude does not apply")
        return value

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Return a quantized copy of ``model``; StageError if no layer was quantized."""
        self._check_targets(model)
        with torch_warnings() as seen:
            try:
                result = self._quantize(model, ctx)
            except BackendError as exc:
                raise StageError(self.label, f"method {self.method}{self._backend_text()}: {exc}") from exc
        self._report_warnings(seen, ctx)
        census = result.census
        if not census.quantized:
            raise StageError(self.label, f"method {self.method} quantized no layer; left float: {layer_census(model)}")
        wanted = {name for name, _ in self._targets(model)}
        wanted -= set(result.record.get("sensitive", []))  # left float on purpose, and noted
        stayed = [name for name in census.left_float if name in wanted]
        if self.method == "dynamic" and stayed:  # torch skips some layers silently: never report them as done
            raise StageError(self.label, f"these layers stayed float: {', '.join(stayed)}")
        ctx.add_metric("quantized_layers", len(census.quantized))
        ctx.add_metric("float_layers", len(census.left_float))
        ctx.note(f"{self.label}: {census.summary(self._verb())}")
        ctx.structure.update(result.record)
        self._caveat(ctx)
        return result.model

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Swap in the same quantized layers as apply did, ready for the saved tensors."""
        with torch_warnings():  # already reported when the stage ran
            if self.method == "static":
                try:
                    return self._static_backend().restore(model, self._static_options(), record)
                except BackendError as exc:
                    where = f"method static{self._backend_text()}"
                    raise StageError(self.label, f"{where}: cannot rebuild the saved model: {exc}") from exc
            if self.method == "weight_only":
                names = record.get("embeddings") or [n for n, _ in self._targets(model)]
                return _swap_embeddings(model, names)
            if self.method == "half":
                return _half(model, self.dtype)
            return self._convert(model, record.get("sensitive", []))

    def _convert(self, model: nn.Module, also_float: list[str] | None = None) -> nn.Module:
        """Dynamic quantization of ``model`` (a copy; the input is left as it was), leaving the
        ``exclude`` patterns and the layers named in ``also_float`` float."""
        from ._quant_ao import quantize_dynamic

        self._select_engine()
        exclude = [*self.exclude, *(also_float or [])]
        return quantize_dynamic(model, self.modules or DYNAMIC_TYPES, self.dtype, exclude, self._per_channel)

    @property
    def _per_channel(self) -> bool:
        return (self.granularity or "per_channel") == "per_channel"

    def _select_engine(self) -> None:
        from ._quant_ao import DEFAULT_ENGINE, select_engine

        # Always select: an engine left by an earlier stage or recipe in this process (onednn has
        # no float16 kernels) must not decide how this stage packs its weights.
        try:
            select_engine(self.backend or DEFAULT_ENGINE)
        except BackendError as exc:
            raise StageError(self.label, f"method dynamic, backend {self.backend}: {exc}") from exc

    def _dynamic(self, model: nn.Module, before: dict[str, str], ctx: Context) -> Quantized:
        sensitive = self._most_sensitive(model, ctx) if self.skip_sensitive else []
        quantized = self._convert(model, sensitive)
        record = {"sensitive": sensitive} if sensitive else {}
        return Quantized(quantized, record, take_census(before, quantized, is_torch_quantized))

    def _most_sensitive(self, model: nn.Module, ctx: Context) -> list[str]:
        """The ``skip_sensitive`` layers whose int8 version alone changes the output most (noted with their errors)."""
        from ._quant_ao import quantize_dynamic_layer
        from ._sensitivity import rank_layers

        names = [name for name, _ in self._targets(model)]
        count = self.skip_sensitive or 0
        if count >= len(names):
            raise StageError(self.label, f"skip_sensitive {count} would leave all {len(names)} candidate layers float")
        self._select_engine()
        batches = list(batch_inputs(ctx.data["calibration"], self.calibration_batches or 4))
        try:
            ranked = rank_layers(model.eval(), names, lambda m, n: quantize_dynamic_layer(m, n, self.dtype, self._per_channel),
                                 batches)
        except ValueError as exc:
            raise StageError(self.label, f"skip_sensitive: {exc}") from exc
        chosen = ranked[:count]
        ctx.note(f"{self.label}: left float the {count} layer(s) int8 hurts most on {len(batches)} calibration batch(es) "
                 f"(output error when quantized alone): " + ", ".join(f"{s.name} {s.error:.2%}" for s in chosen)
                 + f"; the next: {ranked[count].name} {ranked[count].error:.2%}")
        return [s.name for s in chosen]

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        before = module_types(model)
        if self.method == "static":
            batches = batch_inputs(ctx.data["calibration"], self.calibration_batches or 32)
            return self._static_backend().quantize(model, ctx.example_inputs, batches, self._static_options())
        if self.method == "weight_only":
            return self._weight_only(model, before, ctx)
        if self.method == "half":
            half = _half(copy.deepcopy(model), self.dtype)
            census = take_census(before, half, lambda m: _is_cast(m, getattr(torch, self.dtype)), prefix="model.")
            return Quantized(half, {}, census)
        return self._dynamic(model, before, ctx)

    def _weight_only(self, model: nn.Module, before: dict[str, str], ctx: Context) -> Quantized:
        from ._quant_modules import Int8Embedding, embedding_refusal

        names = []
        for name, module in self._targets(model):
            reason = embedding_refusal(module)  # type: ignore[arg-type]
            if reason:
                ctx.note(f"{self.label}: {name} stays float: {reason}")
            else:
                names.append(name)
        quantized = _swap_embeddings(copy.deepcopy(model), names)
        census = take_census(before, quantized, lambda m: isinstance(m, Int8Embedding))
        return Quantized(quantized, {"embeddings": names}, census)

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return select_layers(model, self.modules or (), self.exclude)

    def _check_targets(self, model: nn.Module) -> None:
        if self.method == "half":
            if not any(p.is_floating_point() for p in model.parameters()):
                raise StageError(self.label, "method half: the model has no float parameters to cast")
            return
        if not self._targets(model):
            minus = f" minus exclude {self.exclude}" if self.exclude else ""
            raise StageError(self.label, f"modules {self.modules}{minus} matched no layer; the model has: {layer_census(model)}")

    def _static_options(self) -> StaticOptions:
        return StaticOptions(self.backend or "x86", tuple(self.modules or STATIC_TYPES), tuple(self.exclude))

    def _static_backend(self) -> StaticBackend:
        if self.backend == "torchao":
            from ._quant_torchao import TorchaoBackend

            return TorchaoBackend()
        from ._quant_ao import FxBackend

        return FxBackend()

    def _verb(self) -> str:
        if self.method == "half":
            return f"cast to {self.dtype}"
        if self.method == "static":
            return f"quantized (int8 static, backend {self.backend})"
        if self.method == "weight_only":
            return "quantized (int8 weights, a float scale per row)"
        if self.dtype == "float16":
            return "quantized (float16 weights, dynamic activations)"
        engine = f", engine {self.backend}" if self.backend else ""
        scales = (self.granularity or "per_channel").replace("_", " ")
        return f"quantized (int8 weights {scales}, dynamic activations{engine})"

    def _backend_text(self) -> str:
        return f", backend {self.backend}" if self.backend else ""

    def _report_warnings(self, seen: TorchWarnings, ctx: Context) -> None:
        if seen.deprecations:
            ctx.note(f"torch warned (shown once): {seen.deprecations[0].strip()} torchslim keeps torch.ao.quantization "
                     "in one backend module; static quantization can use torchao instead (backend: torchao)")
        for text in seen.others:
            ctx.log.debug("%s: torch warned: %s", self.label, text)

    def _caveat(self, ctx: Context) -> None:
        if self.method in ("dynamic", "static") and self.backend != "torchao":
            ctx.note(f"{self.method} quantization runs on the CPU only; quantized layers cannot be trained further")
        if self.backend in ("qnnpack", "onednn"):
            ctx.note(f"backend {self.backend}: torch's quantized engine (torch.backends.quantized.engine) is now "
                     f"{self.backend} for this process; loading the saved model sets it too")
        if self.method == "half":
            ctx.note("half precision: float inputs are cast down and outputs back to float32; "
                     "speed depends on the CPU's float16/bfloat16 support and can be slower than float32")


def _swap_embeddings(model: nn.Module, names: list[str]) -> nn.Module:
    from ._quant_modules import Int8Embedding

    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, Int8Embedding.from_float(getattr(parent, attr)))
    return model


def _half(model: nn.Module, dtype: str) -> nn.Module:
    from ._quant_modules import HalfPrecision

    return HalfPrecision(model, getattr(torch, dtype))


def _is_cast(module: nn.Module, dtype: torch.dtype) -> bool:
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.dtype == dtype for p in own)

