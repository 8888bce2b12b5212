"""The ``prune`` family: the options every pruning method shares, and fine-tuning between steps."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context, Stage, option_errors

Fraction = Annotated[float, Field(gt=0, lt=1)]
"""A share strictly between 0 and 1: 0 prunes nothing, 1 would empty every layer."""

DEFAULT_FINETUNE_LR = 1e-3
"""Adam's learning rate for fine-tuning between steps when the recipe gives none."""


class PruneStage(Stage):
    """Prune the model: zero single weights (``magnitude``, ``wanda``), zero weights in an N:M
    pattern (``nm``), or remove whole channels and neurons so that the model is really smaller and
    faster (``structured``).

    A family: each method is a class of its own (:class:`MagnitudePrune`, :class:`WandaPrune`,
    :class:`StructuredPrune`, :class:`NMPrune`) holding only its own options, so an option of
    another method is an unknown field. Unstructured and N:M zeros do not make a dense model
    faster on a CPU; the summary says so.
    """

    default_method: ClassVar[str | None] = "magnitude"

    type: Literal["prune"] = "prune"
    method: str
    """The pruning method; each method class narrows it to its own tag."""
    exclude: list[str] = Field(default_factory=list)
    """Layer name patterns (fnmatch, e.g. ``classifier`` or ``blocks.*.conv1``) left untouched; for
    structured, the channels coupled to an excluded layer stay too."""
    steps: int = Field(default=1, ge=1)
    """Prune in this many increments (gradual pruning), up to the full ``amount`` (or N:M pattern)."""
    finetune_epochs: int | None = Field(default=None, ge=1)
    """Epochs of cross-entropy fine-tuning on the train data between steps (needs ``steps`` >= 2)."""
    finetune_lr: float | None = Field(default=None, gt=0)
    """Adam learning rate of the fine-tuning between steps (default 0.001; only with ``finetune_epochs``)."""
    recalibrate_bn: bool = True
    """After the last step, re-estimate the BatchNorm running statistics on the calibration data: the
    pruned layers no longer produce the statistics the norms stored, and stale ones alone can leave a
    pruned model near chance (false: keep the stored statistics)."""

    @model_validator(mode="before")
    @classmethod
    def _finetune_lr_default(cls, data: Any) -> Any:
        # The learning rate has a default only where fine-tuning runs; without finetune_epochs it
        # stays null, so that a given one is refused instead of silently unused.
        if isinstance(data, Mapping) and data.get("finetune_epochs") is not None and data.get("finetune_lr") is None:
            return {**data, "finetune_lr": DEFAULT_FINETUNE_LR}
        return data

    @model_validator(mode="after")
    def _options_fit(self) -> PruneStage:
        problems = self._problems()
        if problems:
            raise option_errors(self, problems)  # located at each option, not at the stage
        return self

    def _problems(self) -> list[tuple[str, str]]:
        """``(option, message)`` for every option that does not fit the others; methods add their own."""
        problems = []
        if self.finetune_epochs is not None and self.steps < 2:
            problems.append(
                (
                    "finetune_epochs",
                    "fine-tuning runs between steps and needs steps >= 2; to recover "
                    "after a one-step prune, add a distill stage after it",
                )
            )
        if self.finetune_lr is not None and self.finetune_epochs is None:
            problems.append(("finetune_lr", "'finetune_lr' applies only with finetune_epochs"))
        return problems

    def _finetune(self, model: nn.Module, ctx: Context, step: int) -> None:
        """Fine-tune after ``step`` unless it is the last, keeping every zero of the model at zero;
        after the last, re-estimate the BatchNorm statistics (``recalibrate_bn``)."""
        if step == self.steps:
            self._recalibrate(model, ctx)
            return
        if self.finetune_epochs is None:
            return
        from .._masks import ZeroMasks
        from .._train import finetune

        lr = self.finetune_lr or DEFAULT_FINETUNE_LR
        loss = finetune(model, ctx.data["train"], self.finetune_epochs, lr, ZeroMasks.of(model), label=self.label)
        if math.isnan(loss):
            raise StageError(self.label, "finetune_epochs: the train loader yielded no batch")
        ctx.log.info(
            "  prune step %d/%d: fine-tuned, loss %.4f, %s %.2f", step, self.steps, loss, ctx.metric_name, ctx.evaluate(model)
        )
        ctx.add_metric("finetune_loss", loss)

    def _recalibrate(self, model: nn.Module, ctx: Context) -> None:
        """Re-estimate the BatchNorm statistics on the calibration data, and say so in the notes."""
        from ._norms import recalibrate, tracking_norms

        norms = len(tracking_norms(model))
        if not self.recalibrate_bn or norms == 0:
            return
        used = recalibrate(model, ctx.data["calibration"])
        ctx.add_metric("recalibrated_norms", norms if used else 0)
        if used:
            ctx.note(
                f"{self.label}: BatchNorm statistics of {norms} layers re-estimated on {used} calibration "
                f"batches after pruning (recalibrate_bn: false keeps the stored ones)"
            )
