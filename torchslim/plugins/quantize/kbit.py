"""``method: kbit``: 2- to 8-bit integer weights, symmetric or not, per channel or per group, packed at their width."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ...engine.errors import StageError
from ...engine.metrics import latency_batch
from ...engine.stage import Context, option_errors
from .._calibration import calibration_inputs
from . import kernels
from .formats import Format, Grid, QWeight
from .int4pack import KERNEL_GROUPS
from .lowbit import LowBitQuantize


class KbitQuantize(LowBitQuantize):
    """Multi-level integer weights: ``bits`` 2..8, ``w = (code - zero) * scale`` per output channel or
    per group of ``group_size`` input features; rounded to nearest, or GPTQ-style on calibration data.

    The codes are a bit stream of exactly ``bits`` bits per weight (3-bit codes are not padded to 4).
    4-bit Linear layers run torch's int4 kernel where it is faster (``kernel``, :mod:`.kernels`).
    """

    method: Literal["kbit"] = "kbit"
    """``kbit``: integer weights of ``bits`` bits, packed, with float scales."""
    bits: int = 4
    """Bits per weight, 2..8 (1 bit is method binary; {-1, 0, 1} is method ternary)."""
    symmetric: bool = True
    """Symmetric levels around zero (no zero point stored); false stores a zero point per group."""
    grid: Grid | None = None
    """With ``symmetric: true``, where the levels lie (``m``: a group's largest |w|); null: ``mse``.
    ``mse``: codes ``-2**(bits-1) .. 2**(bits-1) - 1`` (zero kept), each group's step the one among 20 (``2m / (2**bits - 1)``
    times 1, 0.95, ... 0.05) that leaves the least squared rounding error, so outliers may be clipped (with
    ``train``, chosen again at every forward pass); ``skewed``: the same codes at the widest of those steps (the
    only grid before this option: at 2 bits {-4m/3, -2m/3, 0, 2m/3}); ``narrow``: zero and both ``+m`` and
    ``-m`` exact, one code unused (2 bits: {-m, 0, m}); ``midrise``: ``2**bits`` levels evenly over ``-m..m``,
    no zero (2 bits: {-m, -m/3, m/3, m}; pruned zeros become nonzero)."""
    group_size: int | None = Field(default=None, ge=1)
    """Input features per scale (e.g. 32 or 128); null: one scale per output channel. Must divide every
    chosen layer's input features (in_channels x kernel size for a convolution)."""
    rounding: Literal["nearest", "gptq"] = "nearest"
    """``nearest`` (round to nearest level) or ``gptq`` (error-compensating, on the calibration data)."""
    calibration_batches: int | None = Field(default=None, ge=1)
    """With ``rounding: gptq`` (default 8): calibration batches the layers' input statistics come from."""
    damp: float | None = Field(default=None, gt=0, lt=1)
    """With ``rounding: gptq`` (default 0.01): dampening added to the Hessian's diagonal, relative to its mean."""
    kernel: Literal["auto", "int4pack", "dequantize"] = "auto"
    """How 4-bit Linear layers compute: ``auto`` runs torch's int4 kernel (bfloat16 inputs) in the layers where
    it is measured faster than dequantizing, ``int4pack`` wherever the kernel can run, ``dequantize`` nowhere."""

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, value: int) -> int:
        if not 2 <= value <= 8:
            raise ValueError(f"bits must be 2..8, not {value} (1 bit is method binary)")
        return value

    @model_validator(mode="after")
    def _gptq_options(self) -> KbitQuantize:
        problems = [
            (o, f"{o} applies to rounding gptq only")
            for o in ("calibration_batches", "damp")
            if getattr(self, o) is not None and self.rounding != "gptq"
        ]
        if problems:
            raise option_errors(self, problems)
        return self

    @model_validator(mode="after")
    def _grid_option(self) -> KbitQuantize:
        if self.grid is not None and not self.symmetric:
            raise option_errors(
                self,
                [
                    (
                        "grid",
                        "grid applies to symmetric: true only (asymmetric levels span each group's min..max with a zero point)",
                    )
                ],
            )
        return self

    @model_validator(mode="after")
    def _kernel_options(self) -> KbitQuantize:
        problems = []
        if self.kernel == "int4pack" and self.bits != 4:
            problems.append(("kernel", f"kernel int4pack is torch's 4-bit kernel: it needs bits 4, not {self.bits}"))
        elif self.kernel == "int4pack" and self.group_size not in (None, *KERNEL_GROUPS):
            problems.append(
                (
                    "kernel",
                    f"kernel int4pack takes group_size {', '.join(map(str, KERNEL_GROUPS))} or "
                    f"null (per channel), not {self.group_size}",
                )
            )
        if problems:
            raise option_errors(self, problems)
        return self

    def layer_format(self) -> Format:
        """``bits``-bit integer codes on this method's grid."""
        return Format("int", self.bits, self.symmetric, self.group_size, grid=self.grid or "mse")

    def _round(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> dict[str, QWeight]:
        if self.rounding == "nearest":
            return super()._round(model, formats, ctx)
        from .gptq import gptq_round

        batches = calibration_inputs(ctx, self.calibration_batches or 8)
        return gptq_round(model.eval(), formats, batches, self.damp or 0.01)

    def _kernels(self, model: nn.Module, formats: dict[str, Format], ctx: Context) -> dict[str, Format]:
        if self.kernel == "dequantize" or self.bits != 4:
            return formats
        # Timed as the run measures latency: the recipe's metrics.batch_size and metrics.threads.
        batch, threads = ctx.latency_batch, ctx.threads or torch.get_num_threads()
        decisions = kernels.decide(model, formats, self.kernel, latency_batch(ctx.example_inputs, batch), threads)
        if self.kernel == "int4pack":
            self._refuse_if_none_runs({n: None if d.kernel == "int4pack" else d.why for n, d in decisions.items()})
        how = "forced" if self.kernel == "int4pack" else f"auto, timed per layer shape at batch {batch}, {threads} thread(s)"
        ctx.note(kernels.note(self.label, decisions, how))
        return kernels.apply(model, formats, decisions)

    def _precheck(self, model: nn.Module, formats: dict[str, Format]) -> None:
        """A forced ``int4pack`` that no chosen layer can run is refused before GPTQ or training, not after."""
        if self.kernel == "int4pack":
            layers = dict(model.named_modules())
            self._refuse_if_none_runs({n: kernels.why_not_float(layers[n], f) for n, f in formats.items()})

    def _refuse_if_none_runs(self, reasons: dict[str, str | None]) -> None:
        """StageError when every chosen layer has a reason (not None) the int4 kernel cannot run it."""
        if reasons and all(why is not None for why in reasons.values()):
            listed = "; ".join(f"{n}: {why}" for n, why in reasons.items())
            raise StageError(
                self.label,
                f"kernel: int4pack: no chosen layer can run torch's int4 kernel ({listed}); use kernel: auto or dequantize",
            )

    def _verb(self) -> str:
        return super()._verb().replace("PTQ", "GPTQ") if self.rounding == "gptq" else super()._verb()
