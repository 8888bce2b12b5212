"""What the below-int8 methods share (binary, ternary, kbit, float8): layer choice, ends at 8 bits,
quantization-aware training, conversion to packed layers, restore and notes.

A method class says only which :class:`.formats.Format` its layers get (and may round differently,
as kbit's GPTQ option does). PTQ and QAT are one option apart: ``train: {epochs: 3}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import Field
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
        fmt = self.layer_format()
        for name, layer in self._targets(model):
            features = weight_of(layer)[0].numel()
            if fmt.group_size and features % fmt.group_size:
                raise StageError(self.label, f"group_size {fmt.group_size} does not divide the {features} input "
                                 f"features of layer '{name}' ({type(layer).__name__}); exclude it or pick a divisor")
        return {name: INT8 if name in ends else fmt for name in names}

    def _round(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> dict[str, QWeight]:
        """Each layer's codes: round to nearest (a method may override, e.g. GPTQ)."""
        layers = dict(model.named_modules())
        return {n: quantize(weight_of(layers[n]).flatten(1), f) for n, f in formats.items()}

    def _kernels(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> dict[str, Format]:
        """The formats with the kernel each converted layer runs (set on the layers too): dequantize unless a
        method chooses otherwise (kbit: torch's int4 kernel where it is faster)."""
        return formats

    def _notes(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> None:
        ends = [n for n, f in formats.items() if replace(f, storage=INT8.storage) == INT8 != self.layer_format()]
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


def _swap(model: nn.Module, formats: dict[str, Format], weights: Mapping[str, QWeight | None],
          layers: dict[str, nn.Module] | None = None) -> nn.Module:
    layers = layers if layers is not None else dict(model.named_modules())
    for name, fmt in formats.items():
        q = weights[name]
        new = LowBitLayer(layers[name], fmt) if q is None else LowBitLayer.convert(layers[name], fmt, q)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model
