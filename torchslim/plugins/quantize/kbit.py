"""``method: kbit``: 2- to 8-bit integer weights, symmetric or not, per channel or per group, packed at their width."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from ...engine.stage import Context, option_errors
from .._quant_base import batch_inputs
from .formats import Format, QWeight
from .lowbit import LowBitQuantize


class KbitQuantize(LowBitQuantize):
    """Multi-level integer weights: ``bits`` 2..8, ``w = (code - zero) * scale`` per output channel or
    per group of ``group_size`` input features; rounded to nearest, or GPTQ-style on calibration data.

    The codes are a bit stream of exactly ``bits`` bits per weight (3-bit codes are not padded to 4).
    """

    method: Literal["kbit"] = "kbit"
    """``kbit``: integer weights of ``bits`` bits, packed, with float scales."""
    bits: int = 4
    """Bits per weight, 2..8 (1 bit is method binary; {-1, 0, 1} is method ternary)."""
    symmetric: bool = True
    """Symmetric levels around zero (no zero point stored); false stores a zero point per group."""
    group_size: int | None = Field(default=None, ge=1)
    """Input features per scale (e.g. 32 or 128); null: one scale per output channel. Must divide every
    chosen layer's input features (in_channels x kernel size for a convolution)."""
    rounding: Literal["nearest", "gptq"] = "nearest"
    """``nearest`` (round to nearest level) or ``gptq`` (error-compensating, on the calibration data)."""
    calibration_batches: int | None = Field(default=None, ge=1)
    """With ``rounding: gptq`` (default 8): calibration batches the layers' input statistics come from."""
    damp: float | None = Field(default=None, gt=0, lt=1)
    """With ``rounding: gptq`` (default 0.01): dampening added to the Hessian's diagonal, relative to its mean."""

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, value: int) -> int:
        if not 2 <= value <= 8:
            raise ValueError(f"bits must be 2..8, not {value} (1 bit is method binary)")
        return value

    @model_validator(mode="after")
    def _gptq_options(self) -> KbitQuantize:
        problems = [(o, f"{o} applies to rounding gptq only") for o in ("calibration_batches", "damp")
                    if getattr(self, o) is not None and self.rounding != "gptq"]
        if problems:
            raise option_errors(self, problems)
        return self

    def layer_format(self) -> Format:
        """``bits``-bit integer codes with this method's scales."""
        return Format("int", self.bits, self.symmetric, self.group_size)

    def _round(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> dict[str, QWeight]:
        if self.rounding == "nearest":
            return super()._round(model, formats, ctx)
        from .gptq import gptq_round

        batches = batch_inputs(ctx.data["calibration"], self.calibration_batches or 8)
        return gptq_round(model.eval(), formats, batches, self.damp or 0.01)

    def _verb(self) -> str:
        return super()._verb().replace("PTQ", "GPTQ") if self.rounding == "gptq" else super()._verb()
