"""Unstructured pruning: single weights zeroed, by magnitude or by magnitude times input norm (wanda)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from ._unstructured import capped_magnitude, torch_magnitude
from .base import Fraction
from .zeroing import Layers, LayerTypes, ZeroingPrune

UNSTRUCTURED_NOTE = (
    "unstructured pruning leaves dense tensors: the zeros alone do not lower latency or the "
    "dense file size on a CPU; a later quantize stage or sparse storage turns them into savings"
)


class MagnitudePrune(ZeroingPrune):
    """Zero the smallest weights (unstructured L1 pruning), all chosen layers ranked together or each alone."""

    cpu_note: ClassVar[str] = UNSTRUCTURED_NOTE

    method: Literal["magnitude"] = "magnitude"
    """``magnitude``: unstructured L1 pruning of single weights."""
    amount: Fraction
    """Fraction of the chosen weights zeroed, between 0 and 1 (exclusive)."""
    scope: Literal["global", "layer"] = "global"
    """``global`` ranks the weights of all chosen layers together; ``layer`` prunes ``amount`` of each layer."""
    modules: LayerTypes = ["Linear", "Conv2d"]  # noqa: RUF012 (pydantic copies a default for each instance)
    """Layer types (torch.nn class names) whose weights are pruned."""
    max_layer_amount: Fraction | None = None
    """Most any one layer may lose, as a fraction of its weights (default: no cap), so that global
    ranking cannot wipe out a small layer."""

    def _step(self, model: nn.Module, layers: Layers, step: int, ctx: Context) -> None:
        amount, chosen = self.amount * step / self.steps, list(layers.values())
        if self.max_layer_amount is None:
            torch_magnitude(chosen, amount, self.scope == "global")
        else:
            capped_magnitude(chosen, amount, self.max_layer_amount, self.scope == "global")


class WandaPrune(ZeroingPrune):
    """Zero in every output row of each Linear layer the weights whose magnitude times the norm of
    their input feature on the calibration data is lowest (Sun et al., 2023)."""

    cpu_note: ClassVar[str] = UNSTRUCTURED_NOTE

    method: Literal["wanda"] = "wanda"
    """``wanda``: unstructured, each Linear weight scored by its magnitude times the norm of its
    input feature on the calibration data, the lowest ``amount`` of every output row zeroed."""
    amount: Fraction
    """Fraction of every output row's weights zeroed, between 0 and 1 (exclusive)."""
    modules: LayerTypes = ["Linear"]  # noqa: RUF012 (pydantic copies a default for each instance)
    """Layer types whose weights are pruned: ``[Linear]``, the only type wanda takes."""
    calibration_batches: int = Field(default=8, ge=1)
    """Batches of the calibration data the input norms are measured on."""

    @field_validator("modules")
    @classmethod
    def _linear_only(cls, value: list[str]) -> list[str]:
        others = [name for name in value if name != "Linear"]
        if others:
            raise ValueError(f"method wanda prunes Linear layers only, not {', '.join(others)}")
        return value

    def _step(self, model: nn.Module, layers: Layers, step: int, ctx: Context) -> None:
        # Norms are measured again before each step: the earlier steps changed what later layers see.
        from .._calibration import calibration_inputs
        from ._wanda import input_norms, prune_rows

        batches = calibration_inputs(ctx, self.calibration_batches)
        try:
            norms = input_norms(model.eval(), layers, batches)
        except ValueError as exc:
            raise StageError(self.label, f"method wanda: {exc}") from exc
        for name, layer in layers.items():
            prune_rows(layer, norms[name], self.amount * step / self.steps)
