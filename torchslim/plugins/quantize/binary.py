"""``method: binary``: 1-bit weights, ``sign(w) * mean|w|`` per output channel (XNOR-Net), packed 8 per byte;
optionally binary activations too (XNOR-Net's ``sign(x) * K`` inputs, :mod:`.activations`)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from ._backends import Quantized
from .activations import fed_by_model_input
from .formats import Format
from .lowbit import LowBitQuantize

#: Said when binary activations are on: what runs, honestly (docs/quantize.md).
FLOAT_SIGN = "computed as a float sign(x) * K and torch's float kernel: no XNOR/popcount kernel on this CPU, smaller, not faster"


class BinaryQuantize(LowBitQuantize):
    """Binary weights: each weight is +scale or -scale, the scale being its output channel's mean |w|.

    Post-training binarization destroys most networks; use ``train`` (quantization-aware training)
    and usually ``keep_ends``. A weight that is exactly zero (pruned) becomes +scale: 1 bit has no zero.
    With ``activations: binary`` the inputs of every layer stored binary are binarized as well.
    """

    method: Literal["binary"] = "binary"
    """``binary``: 1-bit weights times a float scale per output channel."""
    activations: Literal["float", "binary"] = "float"
    """``float``: the layers keep float inputs (weights only). ``binary``: every layer stored binary gets
    ``sign(x) * mean|x|`` (per sample) as its input (XNOR-Net); layers kept at int8 by ``keep_ends`` (with
    ``first`` or ``both``, the first layer, which takes the raw data) and layers left float keep float inputs.
    At least one binarized layer must take another layer's activations."""

    def layer_format(self) -> Format:
        """1 bit per weight, scale per output channel; binary inputs with ``activations: binary``."""
        return Format("binary", 1, activations=self.activations)

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        if self.activations != "binary":
            return super()._quantize(model, ctx)
        formats = self._formats(model)
        # Which layers take the model's input is structure: one forward pass serves the check and the note.
        names, raw = _binarized(model, formats, ctx)
        self._check_activations(names, raw)  # before any training: a refusal costs nothing
        result = super()._quantize(model, ctx)
        self._note_activations(names, raw, formats, ctx)
        return result

    def _check_activations(self, names: list[str], raw: dict[str, bool]) -> None:
        """StageError unless a binarized layer takes another layer's activations (what "supported" means)."""
        if any(raw.get(n) is False for n in names):
            return
        fix = "use activations: float"
        if not names:
            detail, fix = f"every chosen layer is kept at int8 (keep_ends {self.keep_ends})", f"{fix} or keep_ends none"
        elif any(raw.values()):
            detail = f"the binarized layers take only the model's input ({', '.join(n for n in names if raw.get(n))})"
        else:
            detail = f"the binarized layers ({', '.join(names)}) did not run on the example inputs"
        raise StageError(
            self.label,
            "activations: binary activations need a binarized Linear or Conv2d that takes "
            f"another layer's activations; {detail}; {fix}",
        )

    def _note_activations(self, names: list[str], raw: dict[str, bool], formats: dict[str, Format], ctx: Context) -> None:
        first = [n for n in names if raw.get(n)]
        kept = [n for n in formats if n not in names]
        ctx.note(
            f"{self.label}: binary activations (sign(x) * mean|x| per sample) into {', '.join(names)}"
            + (f" ({', '.join(first)}: the model's input)" if first else "")
            + (f"; float inputs: {', '.join(kept)} (kept at int8)" if kept else "")
            + f"; {FLOAT_SIGN}"
        )


def _binarized(model: nn.Module, formats: dict[str, Format], ctx: Context) -> tuple[list[str], dict[str, bool]]:
    """The layers given binary inputs, and for those that run, whether they take the model's input."""
    names = [n for n, f in formats.items() if f.activations == "binary"]
    return names, fed_by_model_input(model, names, ctx.example_inputs)
