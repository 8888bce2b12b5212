"""``method: static``: int8 weights and activations, calibrated on the calibration data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from .._calibration import Calibration
from ._backends import STATIC_TYPES, BackendError, Quantized, StaticBackend, StaticOptions
from ._padding import numeric_padding
from ._subclass import as_base_layers, swap_to_base
from .base import LayerQuantize, engine_note


class StaticQuantize(LayerQuantize):
    """Post-training static quantization: int8 weights and activations, the activations' scales
    calibrated on the calibration data.

    Conv and Linear layers are fused with their BatchNorm and ReLU neighbours; between int8
    layers the activations stay int8, so whole convolutional networks run int8 kernels. A model
    torch.fx cannot trace is quantized layer by layer in eager mode instead (a note says so), and
    the user's subclasses of these layers are quantized as their base class.
    """

    supported: ClassVar[tuple[str, ...]] = STATIC_TYPES

    method: Literal["static"] = "static"
    """``static``: int8 weights and activations, calibrated on the calibration data (Conv, Linear,
    fused with their BatchNorm/ReLU)."""
    modules: list[str] = Field(default_factory=lambda: list(STATIC_TYPES))
    """Layer types (torch.nn class names) to quantize, by default all those supported: Linear, Conv1d, Conv2d, Conv3d."""
    dtype: Literal["qint8"] = "qint8"
    """Weight and activation type: ``qint8``."""
    backend: Literal["x86", "qnnpack", "torchao"] = "x86"
    """``x86`` or ``qnnpack`` (ARM) run torch's FX graph-mode quantization; ``torchao`` runs
    torchao's PT2E flow with torch.compile (torchao must be installed)."""
    calibration_batches: int = Field(default=32, ge=1)
    """Batches of the calibration data run through the observers."""

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        base = as_base_layers(model, self.modules, self.exclude, ctx.example_inputs)
        padded = numeric_padding(base.model, self.modules, self.exclude)  # restore redoes it on the built model
        batches = Calibration.of(ctx, self.calibration_batches)
        options = self._options([*base.kept, *padded.kept])
        result = self._backend().quantize(padded.model, ctx.example_inputs, batches, options)
        subclasses = {"as_base_class": list(base.swapped), "left_float_subclasses": list(base.kept)}
        result.record.update({key: names for key, names in subclasses.items() if names})
        for note in [*base.notes(), *padded.notes(), *result.notes]:
            ctx.note(f"{self.label}: {note}")
        return result

    def _restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        model = swap_to_base(model, record.get("as_base_class", []))
        padded = numeric_padding(model, self.modules, self.exclude, in_place=True)
        options = self._options([*record.get("left_float_subclasses", []), *padded.kept])
        try:
            return self._backend().restore(padded.model, options, record)
        except BackendError as exc:
            raise StageError(self.label, f"{self._where()}: cannot rebuild the saved model: {exc}") from exc

    def _options(self, keep_float: Iterable[str] = ()) -> StaticOptions:
        return StaticOptions(self.backend, tuple(self.modules), tuple(self.exclude), tuple(keep_float))

    def check_environment(self) -> None:
        """Import the optional backend (torchao) now, as ``torchslim validate`` asks, not when the stage starts."""
        if self.backend == "torchao":
            import importlib

            from ._torchao import INSTALL

            try:
                importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")
            except ImportError as exc:
                raise StageError(self.label, f"{self._where()}: torchao does not import ({exc}); {INSTALL}") from None

    def _backend(self) -> StaticBackend:
        if self.backend == "torchao":
            from ._torchao import TorchaoBackend

            return TorchaoBackend()
        from ._ao import FxBackend

        return FxBackend()

    def _verb(self) -> str:
        return f"quantized (int8 static, backend {self.backend})"

    def _cpu_only(self) -> bool:
        # torchao's flow leaves a compiled graph, not torch.ao's CPU-only quantized modules.
        return self.backend != "torchao"

    def _caveats(self) -> list[str]:
        return engine_note(self.backend)

    def _where(self) -> str:
        return f"method static, backend {self.backend}"
