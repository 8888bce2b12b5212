"""The ``quantize`` family's base: what every method shares, from checking its targets to its notes.

:meth:`QuantizeStage.apply` runs the same steps for every method: it checks that the model holds
something to quantize, lets the method quantize (with torch's warnings collected), refuses a
result in which nothing was quantized, then reports the census and records what restore needs.
A method class supplies the quantization itself, its restore, and the words of its notes.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ...engine.errors import StageError
from ...engine.metrics import model_device
from ...engine.stage import Context, Stage
from .._layers import check_patterns, layer_census, layer_type, select_layers
from ._backends import BackendError, Quantized, TorchWarnings, torch_warnings


class QuantizeStage(Stage):
    """Replace float layers by ones with real low-precision kernels (never simulated int8).

    A family: each method is a class of its own holding only its own options (``QuantizeStage.methods``
    lists the eleven: dynamic, static, weight_only, half, binary, ternary, kbit, float8, ort_static,
    ort_dynamic, nncf; :mod:`torchslim.plugins.quantize` says what each does), so an option of
    another method is an unknown field. Every method reports which layers it quantized and which
    it left float, and records what a saved model needs to be loaded again.
    """

    default_method: ClassVar[str | None] = "dynamic"

    type: Literal["quantize"] = "quantize"
    """The stage type: ``quantize``."""
    method: str
    """The quantization method; each method class narrows it to its own tag."""

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Return a quantized copy of ``model``; StageError if no layer was quantized."""
        model = self._on_cpu_if_needed(model, ctx)
        self._check_targets(model)
        with torch_warnings() as seen:
            try:
                result = self._quantize(model, ctx)
            except BackendError as exc:
                raise StageError(self.label, f"{self._where()}: {exc}") from exc
        self._report_warnings(seen, ctx)
        if not result.census.quantized:
            raise StageError(self.label, f"method {self.method} quantized no layer; left float: {layer_census(model)}")
        self._check_result(model, result)
        ctx.add_metric("quantized_layers", len(result.census.quantized))
        ctx.add_metric("float_layers", len(result.census.left_float))
        ctx.note(f"{self.label}: {result.census.summary(self._verb())}")
        ctx.record_for_restore(**result.record)
        for note in ([cpu_only_note(self.method)] if self._cpu_only() else []) + self._caveats():
            ctx.note(note)
        return result.model

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Swap in the same quantized layers as apply did, ready for the saved tensors."""
        with torch_warnings():  # already reported when the stage ran
            return self._restore(model, record)

    @abstractmethod
    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        """The quantized copy of ``model`` (the input is left as it was), its census and restore record."""

    @abstractmethod
    def _restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """:meth:`restore`'s work, inside the collection of torch's warnings."""

    @abstractmethod
    def _verb(self) -> str:
        """What the census note says was done, e.g. ``quantized (int8 static, backend x86)``."""

    def _check_targets(self, model: nn.Module) -> None:
        """StageError if ``model`` has nothing this method could quantize (before any work is done)."""

    def _check_result(self, model: nn.Module, result: Quantized) -> None:
        """StageError if the result is not what was asked for (beyond quantizing no layer at all)."""

    def _caveats(self) -> list[str]:
        """Notes on what the method's result cannot do, added under the summary (the CPU-only one aside:
        :meth:`_cpu_only` adds it)."""
        return []

    def _where(self) -> str:
        """How a backend's error names the stage's method: ``method static, backend x86``."""
        return f"method {self.method}"

    def _cpu_only(self) -> bool:
        """True for a method whose quantized layers run on the CPU only (torch.ao's): the model is moved to the
        CPU before quantizing, and the note of :func:`cpu_only_note` says so under the summary."""
        return False

    def _on_cpu_if_needed(self, model: nn.Module, ctx: Context) -> nn.Module:
        """The model, moved to the CPU first (with a note) when this method runs on the CPU only and
        the model is elsewhere (``device: cuda``): its calibration batches and kernels are CPU ones."""
        device = model_device(model)
        if device.type == "cpu" or not self._cpu_only():
            return model
        ctx.note(
            f"{self.label}: moved the model from {device} to the CPU before quantizing: {self.method} "
            f"quantization runs on the CPU only, so this row and every later one are measured on the CPU"
        )
        return model.to("cpu")

    def _report_warnings(self, seen: TorchWarnings, ctx: Context) -> None:
        if seen.deprecations:
            ctx.note(deprecation_note(seen.deprecations[0]))
        for text in seen.others:
            ctx.log.debug("%s: torch warned: %s", self.label, text)


class LayerQuantize(QuantizeStage):
    """A method that quantizes chosen layers: those of the ``modules`` types, minus ``exclude``.

    Each method class sets ``supported`` and declares ``modules`` again with its own default.
    """

    supported: ClassVar[tuple[str, ...]] = ()
    """The layer types (torch.nn class names) the method really quantizes; others are refused."""
    unsupported_reason: ClassVar[str] = ""
    """Said after a refused layer type, e.g. `` (torch would leave it float)``."""

    modules: list[str]
    """Layer types (torch.nn class names) to quantize."""
    exclude: list[str] = Field(default_factory=list)
    """Layer name patterns (fnmatch, e.g. ``classifier``, ``stem.*``) left float."""

    @field_validator("modules")
    @classmethod
    def _supported(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one layer type")
        method = cls.model_fields["method"].default
        for name in value:
            layer_type(name)  # a typo is named as such, not as an unsupported type
            if name not in cls.supported:
                raise ValueError(
                    f"{method} quantization cannot quantize {name}{cls.unsupported_reason}; supported: {', '.join(cls.supported)}"
                )
        return value

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return select_layers(model, self.modules, self.exclude)

    def _check_targets(self, model: nn.Module) -> None:
        check_patterns(model, self.exclude, "exclude", self.label)
        if not self._targets(model):
            minus = f" minus exclude {self.exclude}" if self.exclude else ""
            raise StageError(self.label, f"modules {self.modules}{minus} matched no layer; the model has: {layer_census(model)}")


_REMOVAL = re.compile(r"\s*,?\s*(?:and )?(?:it )?will be removed in (?:torch |PyTorch |version )?(\d+)\.(\d+)\b\.?")


def deprecation_note(text: str, version: str = torch.__version__) -> str:
    """torch's deprecation warning as a note that is true for the installed torch.

    torch 2.13 still says "torch.ao.quantization is deprecated and will be removed in 2.10": a
    removal release already reached is not repeated as a future event; the note says what holds
    (deprecated, still present in this version).
    """
    text = " ".join(text.split())
    found = _REMOVAL.search(text)
    installed = tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:2])
    if found and installed >= (int(found[1]), int(found[2])):
        removal = f"{found[1]}.{found[2]}"
        text = (
            f"{text[: found.start()].rstrip(' .')} (its warning says it will be removed in {removal}, yet torch "
            f"{version.split('+')[0]} still has it){text[found.end() :].rstrip()}"
        )
    note = f"torch warned (shown once): {text.rstrip('.')}"
    if "torch.ao.quantization" in text:
        note += (
            "; torchslim keeps torch.ao.quantization in one backend module; static quantization can use "
            "torchao instead (backend: torchao)"
        )
    return note


def cpu_only_note(method: str) -> str:
    """The caveat of torch.ao's quantized layers."""
    return f"{method} quantization runs on the CPU only; quantized layers cannot be trained further"


def engine_note(backend: str | None) -> list[str]:
    """The caveat of a backend that switches torch's quantized engine for the whole process."""
    if backend not in ("qnnpack", "onednn"):
        return []
    return [
        f"backend {backend}: torch's quantized engine (torch.backends.quantized.engine) is now "
        f"{backend} for this process; loading the saved model sets it too"
    ]


def has_vnni() -> bool:
    """Whether this CPU has VNNI int8 dot products (AVX512-VNNI or AVX-VNNI), by torch's own CPU check."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)  # private in torch 2.13: absent means unknown
    return bool(check()) if check is not None else False
