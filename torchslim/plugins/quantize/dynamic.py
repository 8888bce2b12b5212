"""``method: dynamic``: int8 (or float16) weights, activations quantized on the fly, by torch.ao."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from ...engine.errors import StageError, first_line
from ...engine.stage import Context, option_errors
from .._calibration import calibration_inputs
from .._layers import layer_type
from ._backends import BackendError, Quantized, is_torch_quantized, module_types, take_census
from ._identity import bypassed_layers, bypassed_note
from ._subclass import as_base_layers, swap_to_base
from .base import LayerQuantize, engine_note, has_vnni

#: Layer types torch's dynamic quantization really converts. It accepts others (Conv2d)
#: and silently leaves them float, so anything else is refused at validation.
DYNAMIC_TYPES = ("Linear", "LSTM", "GRU", "LSTMCell", "GRUCell", "RNNCell")
#: Calibration batches the layers' sensitivity is measured on when the recipe gives none.
SENSITIVITY_BATCHES = 4


class DynamicQuantize(LayerQuantize):
    """Dynamic quantization: int8 (or float16) weights, activations quantized on the fly at each call.

    No calibration data needed; for Linear and recurrent layers (transformers, LSTMs), whose
    run time is dominated by their weights.
    """

    supported: ClassVar[tuple[str, ...]] = DYNAMIC_TYPES
    unsupported_reason: ClassVar[str] = " (torch would leave it float)"

    method: Literal["dynamic"] = "dynamic"
    """``dynamic``: int8 weights, activations quantized on the fly (Linear, LSTM, GRU)."""
    modules: list[str] = Field(default_factory=lambda: ["Linear"])
    """Layer types (torch.nn class names) to quantize, by default ``[Linear]``; supported: Linear, LSTM, GRU,
    LSTMCell, GRUCell, RNNCell."""
    dtype: Literal["qint8", "float16"] = "qint8"
    """Weight type: ``qint8``, or ``float16`` (half the size, float kernels)."""
    backend: Literal["x86", "onednn", "qnnpack"] | None = None
    """The engine that packs the int8 weights and so runs them, ``x86``, ``onednn`` or ``qnnpack``.
    Default: torch's default engine when torchslim was imported (``x86`` on x86 CPUs)."""
    skip_sensitive: int | None = Field(default=None, ge=1)
    """Leave float the N layers whose int8 version, each quantized alone, moves the model's output
    most on the calibration data (mixed precision)."""
    calibration_batches: int | None = Field(default=None, ge=1)
    """With ``skip_sensitive`` (default 4): batches of the calibration data the layers' sensitivity is measured on."""
    granularity: Literal["per_channel", "per_tensor"] | None = None
    """dtype qint8 only (default ``per_channel``): one weight scale per output channel, or one per
    layer (torch's own default). Same kernels and speed; per channel is more accurate."""
    reduce_range: bool | None = None
    """dtype qint8 only: quantize the Linear layers' activations to 7 bits (``true``, what torch's module
    always does) or to 8 (``false``). Default: 8 bits on CPUs with VNNI int8 dot products, whose
    kernels accumulate in 32 bits, 7 elsewhere (the AVX2 kernels' 16-bit pair sums could saturate).
    8 bits keep the outputs closer to the float model's at the same size and speed (docs/quantize.md)."""

    @model_validator(mode="after")
    def _options_fit(self) -> DynamicQuantize:
        problems = []
        if self.calibration_batches is not None and self.skip_sensitive is None:
            problems.append(("calibration_batches", "calibration_batches applies to method dynamic only with skip_sensitive"))
        if self.granularity is not None and self.dtype != "qint8":
            problems.append(("granularity", f"granularity applies to dtype qint8 only, not {self.dtype}"))
        if self.reduce_range is not None and self.dtype != "qint8":
            problems.append(("reduce_range", f"reduce_range applies to dtype qint8 only, not {self.dtype}"))
        if problems:
            raise option_errors(self, problems)
        return self

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        base = as_base_layers(model, self.modules, self.exclude, ctx.example_inputs)
        before = module_types(base.model)
        sensitive = self._most_sensitive(base.model, ctx) if self.skip_sensitive else []
        quantized = self._convert(base.model, sensitive, self._reduce_range)
        bypassed = self._bypassed(quantized, ctx)
        if bypassed:  # the model computes with these layers' weights itself: int8, they would never run
            quantized = self._convert(base.model, [*sensitive, *bypassed], self._reduce_range)
            ctx.note(f"{self.label}: {bypassed_note(bypassed)}")
        record: dict[str, Any] = {"sensitive": sensitive} if sensitive else {}
        if bypassed:
            record["bypassed"] = bypassed
        if self.dtype == "qint8":
            record["reduce_range"] = self._reduce_range  # decided on this CPU: a reload elsewhere keeps it
        if base.swapped:
            record["as_base_class"] = list(base.swapped)
        for note in base.notes():
            ctx.note(f"{self.label}: {note}")
        return Quantized(quantized, record, take_census(before, quantized, is_torch_quantized))

    def _restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        model = swap_to_base(model, record.get("as_base_class", []))
        # Runs saved before the option existed were 7-bit: torch's own behaviour.
        also_float = [*record.get("sensitive", []), *record.get("bypassed", [])]
        return self._convert(model, also_float, bool(record.get("reduce_range", True)))

    def _bypassed(self, quantized: nn.Module, ctx: Context) -> list[str]:
        """The quantized layers the model's forward on the example inputs computes with but never calls."""
        names = list(take_census({}, quantized, is_torch_quantized).quantized)
        try:
            return bypassed_layers(quantized, names, lambda m: m(ctx.example_inputs))
        except Exception as exc:  # the user's forward around torch's int8 layers
            raise StageError(
                self.label,
                f"{self._where()}: the quantized model's forward failed on the example inputs ({first_line(exc, typed=True)})",
            ) from exc

    def _convert(self, model: nn.Module, also_float: list[str], reduce_range: bool) -> nn.Module:
        """Dynamic quantization of ``model`` (a copy; the input is left as it was), leaving the
        ``exclude`` patterns and the layers named in ``also_float`` float."""
        from ._ao import quantize_dynamic

        self._select_engine()
        exclude = [*self.exclude, *also_float]
        return quantize_dynamic(model, self.modules, self.dtype, exclude, self._per_channel, reduce_range)

    @property
    def _per_channel(self) -> bool:
        return (self.granularity or "per_channel") == "per_channel"

    @property
    def _reduce_range(self) -> bool:
        return self.reduce_range if self.reduce_range is not None else not has_vnni()

    def _select_engine(self) -> None:
        from ._ao import DEFAULT_ENGINE, select_engine

        # Always select: an engine left by an earlier stage or recipe in this process (onednn has
        # no float16 kernels) must not decide how this stage packs its weights.
        try:
            select_engine(self.backend or DEFAULT_ENGINE)
        except BackendError as exc:
            raise StageError(self.label, f"{self._where()}: {exc}") from exc

    def _most_sensitive(self, model: nn.Module, ctx: Context) -> list[str]:
        """The ``skip_sensitive`` layers whose int8 version alone changes the output most (noted with their errors)."""
        from ._sensitivity import rank_layers, ranking_note

        names = list(self._convertible(model))
        count = self.skip_sensitive or 0
        if count >= len(names):
            raise StageError(self.label, f"skip_sensitive {count} would leave all {len(names)} candidate layers float")
        self._select_engine()
        batches = calibration_inputs(ctx, self.calibration_batches or SENSITIVITY_BATCHES)
        try:
            ranked = rank_layers(model.eval(), names, self._quantize_one, batches)
        except ValueError as exc:
            raise StageError(self.label, f"skip_sensitive: {exc}") from exc
        ctx.note(f"{self.label}: {ranking_note(ranked, count, len(batches))}")
        return [s.name for s in ranked[:count]]

    def _quantize_one(self, model: nn.Module, name: str) -> nn.Module:
        from ._ao import quantize_dynamic_layer

        return quantize_dynamic_layer(model, name, self.dtype, self._per_channel, self._reduce_range)

    def _convertible(self, model: nn.Module) -> list[str]:
        """The targets torch converts: of exactly the ``modules`` types (a subclass left float is not)."""
        exact = tuple(layer_type(name) for name in self.modules)
        return [name for name, layer in self._targets(model) if type(layer) in exact]

    def _check_result(self, model: nn.Module, result: Quantized) -> None:
        # torch skips some layers silently (a type it has no kernel for): never report them as done.
        # The subclass layers turned into their base class count; those left float are in a note.
        wanted = {*self._convertible(model), *result.record.get("as_base_class", [])}
        wanted -= {*result.record.get("sensitive", []), *result.record.get("bypassed", [])}
        stayed = [name for name in result.census.left_float if name in wanted]
        if stayed:
            raise StageError(self.label, f"these layers stayed float: {', '.join(stayed)}")

    def _verb(self) -> str:
        if self.dtype == "float16":
            return "quantized (float16 weights, dynamic activations)"
        engine = f", engine {self.backend}" if self.backend else ""
        scales = (self.granularity or "per_channel").replace("_", " ")
        bits = 7 if self._reduce_range else 8
        return f"quantized (int8 weights {scales}, dynamic {bits}-bit activations{engine})"

    def _cpu_only(self) -> bool:
        return True

    def _caveats(self) -> list[str]:
        return engine_note(self.backend)

    def _where(self) -> str:
        return f"method dynamic, backend {self.backend}" if self.backend else "method dynamic"
