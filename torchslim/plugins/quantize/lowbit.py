"""What the below-int8 methods share (binary, ternary, kbit, float8): layer choice, ends at 8 bits,
quantization-aware training, conversion to packed layers, restore and notes.

A method class says only which :class:`.formats.Format` its layers get (and may round differently,
as kbit's GPTQ option does). PTQ and QAT are one option apart: ``train: {epochs: 3}``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from .._layers import bias_of, select_layers, weight_of
from ._backends import Quantized, module_types, take_census
from .base import LayerQuantize
from .formats import Format, QWeight, quantize, storage_for
from .layers import LowBitLayer
from .qat import QatOptions, train

LOWBIT_TYPES = ("Linear", "Conv2d")
#: The format of a layer kept at 8 bits by ``keep_ends``.
INT8 = Format("int", 8)
#: Said in the note of every low-bit stage: the layers unpack their codes at each call (docs/quantize.md).
NOT_FASTER = "smaller, not faster on this CPU: the layers dequantize their packed weights on the fly (docs/quantize.md)"


class LowBitQuantize(LayerQuantize):
    """A method that stores the weights of Linear and Conv2d layers (and their subclasses) below 8 bits."""

    supported: ClassVar[tuple[str, ...]] = LOWBIT_TYPES

    modules: list[str] = Field(default_factory=lambda: list(LOWBIT_TYPES))
    """Layer types to quantize (subclasses included), by default ``[Linear, Conv2d]``."""
    keep_ends: Literal["none", "first", "last", "both"] = "none"
    """Keep the first, the last or both chosen layers at int8 (per channel), customary for binary and
    ternary networks; named in the stage's note."""
    train: QatOptions | None = None
    """Quantization-aware training before converting (e.g. ``{epochs: 3, lr: 0.001}``); null: post-training
    quantization of the weights as they are."""
    layer_bits: dict[str, int] = Field(default_factory=dict)
    """Bits of some chosen layers, by name pattern (fnmatch; the first pattern that matches wins), instead of
    the method's: 1 is binary (sign times the output channel's mean |w|), 2..8 integer codes (kbit's with its
    ``symmetric``, ``grid`` and ``group_size``; for the other methods symmetric, ``mse`` grid, per channel).
    Mixed precision by hand, or chosen by ``torchslim search`` (``per_layer``, docs/search.md)."""

    #: The :class:`torchslim.engine.hooks.PerUnit` hook: one bit width per layer, in ``layer_bits``.
    unit_kind: ClassVar[str] = "layer"
    unit_setting: ClassVar[str] = "bits"
    unit_option: ClassVar[str] = "layer_bits"

    @field_validator("layer_bits")
    @classmethod
    def _bits_known(cls, value: dict[str, int]) -> dict[str, int]:
        wrong = [f"{name}: {bits}" for name, bits in value.items() if not 1 <= bits <= 8]
        if wrong:
            raise ValueError(f"bits must be 1..8 ({', '.join(wrong)})")
        return value

    def layer_format(self) -> Format:
        """The format of every chosen layer (but the ends kept at 8 bits)."""
        raise NotImplementedError

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        copied = copy.deepcopy(model)
        formats = self._formats(copied)
        self._precheck(copied, formats)
        if self.train is not None:
            outcome = train(self.label, self.train, copied, formats, ctx)
            ctx.add_metric("train_loss", outcome.train_loss)
            ctx.add_metric(f"best_{ctx.metric_name}", outcome.best_score)
        weights = self._round(copied, formats, ctx)
        layers = dict(copied.named_modules())
        formats = {n: replace(f, storage=storage_for(weights[n].scale, bias_of(layers[n]))) for n, f in formats.items()}
        converted = _swap(copied, formats, weights)
        formats = self._kernels(converted, formats, ctx)
        self._notes(copied, formats, ctx)
        census = take_census(module_types(model), converted, lambda m: isinstance(m, LowBitLayer))
        return Quantized(converted, {"layers": {n: f.record() for n, f in formats.items()}}, census)

    def units(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        """The layers this stage quantizes (the :class:`~torchslim.engine.hooks.PerUnit` hook)."""
        return [name for name, _ in self._targets(model)]

    def uniform_setting(self) -> float:
        """The bits of every chosen layer as written (binary 1, ternary 2, kbit its ``bits``)."""
        return float(self.layer_format().bits)

    def alone(self, unit: str, setting: float, units: Sequence[str]) -> LowBitQuantize:
        """This stage quantizing ``unit`` alone, at ``setting`` bits."""
        others = [*self.exclude, *(u for u in units if u != unit)]
        return self.model_copy(update={"layer_bits": {unit: int(setting)}, "exclude": others, "keep_ends": "none"})

    def bits_format(self, bits: int) -> Format:
        """The format of a layer given ``bits`` by ``layer_bits``."""
        own = self.layer_format()
        if bits == 1:
            return Format("binary", 1)
        return replace(own, bits=bits) if own.kind == "int" else Format("int", bits)

    def _precheck(self, model: nn.Module, formats: dict[str, Format]) -> None:
        """Refuse now what the conversion would refuse after the rounding and training (nothing here)."""

    def _restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        formats = {name: Format.of(fmt) for name, fmt in record["layers"].items()}
        layers = dict(model.named_modules())
        return _swap(model, formats, {n: None for n in formats}, layers)

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in select_layers(model, self.modules, self.exclude) if convertible(m) is None]

    def _formats(self, model: nn.Module) -> dict[str, Format]:
        """Each chosen layer's format; StageError if a group size does not fit a layer."""
        names = [name for name, _ in self._targets(model)]
        ends = {"first": names[:1], "last": names[-1:], "both": [names[0], names[-1]], "none": []}[self.keep_ends]
        formats = {name: INT8 if name in ends else self.layer_format() for name in names}
        formats.update(self._chosen_bits(names))
        for name, layer in self._targets(model):
            fmt, features = formats[name], weight_of(layer)[0].numel()
            if fmt.group_size and features % fmt.group_size:
                raise StageError(
                    self.label,
                    f"group_size {fmt.group_size} does not divide the {features} input "
                    f"features of layer '{name}' ({type(layer).__name__}); exclude it or pick a divisor",
                )
        return formats

    def _chosen_bits(self, names: list[str]) -> dict[str, Format]:
        """The formats ``layer_bits`` gives; StageError for a pattern that matches no chosen layer."""
        unused = [p for p in self.layer_bits if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unused:
            raise StageError(
                self.label,
                f"layer_bits: {', '.join(unused)} matches no layer this stage quantizes ({', '.join(names) or 'none'})",
            )
        chosen = {}
        for name in names:
            bits = next((b for p, b in self.layer_bits.items() if fnmatch.fnmatchcase(name, p)), None)
            if bits is not None:
                chosen[name] = self.bits_format(bits)
        return chosen

    def _round(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> dict[str, QWeight]:
        """Each layer's codes: round to nearest (a method may override, e.g. GPTQ)."""
        layers = dict(model.named_modules())
        return {n: quantize(weight_of(layers[n]).flatten(1), f) for n, f in formats.items()}

    def _kernels(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> dict[str, Format]:
        """The formats with the kernel each converted layer runs (set on the layers too): dequantize unless a
        method chooses otherwise (kbit: torch's int4 kernel where it is faster)."""
        return formats

    def _notes(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> None:
        chosen = self._chosen_bits(list(formats)) if self.layer_bits else {}
        ends = [
            n for n, f in formats.items() if replace(f, storage=INT8.storage) == INT8 != self.layer_format() and n not in chosen
        ]
        if chosen:
            ctx.note(f"{self.label}: bits per layer (layer_bits): {', '.join(f'{n} {f.bits}' for n, f in chosen.items())}")
        if ends:
            ctx.note(f"{self.label}: kept at int8 (keep_ends {self.keep_ends}): {', '.join(ends)}")
        for name, layer in select_layers(model, self.modules, self.exclude):
            reason = convertible(layer) if name not in formats else None
            if reason:
                ctx.note(f"{self.label}: {name} stays float: {reason}")
        said = [f"trained {self.train.epochs} epoch(s) with fake quantization"] if self.train else []
        if all(f.kernel == "dequantize" for f in formats.values()):  # else the kernel choice has its own note
            said.append(NOT_FASTER)
        if said:
            ctx.note(f"{self.label}: {', '.join(said)}")

    def _verb(self) -> str:
        how = "QAT" if self.train else "PTQ"
        return f"quantized ({self.layer_format().describe()}, {how}, packed)"


def convertible(layer: nn.Module) -> str | None:
    """Why ``layer`` (a Linear or Conv2d, or a subclass) cannot become a :class:`LowBitLayer`, or None."""
    base = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
    if type(layer).forward is not base.forward:
        return f"{type(layer).__name__} has its own forward, which a packed layer would not run"
    if isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "an attention projection whose weight its parent reads directly"
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return f"padding_mode {layer.padding_mode} is not supported"
    return None


def _swap(
    model: nn.Module,
    formats: dict[str, Format],
    weights: Mapping[str, QWeight | None],
    layers: dict[str, nn.Module] | None = None,
) -> nn.Module:
    layers = layers if layers is not None else dict(model.named_modules())
    for name, fmt in formats.items():
        q = weights[name]
        new = LowBitLayer(layers[name], fmt) if q is None else LowBitLayer.convert(layers[name], fmt, q)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model
