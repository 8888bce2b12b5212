"""Built-in ``distill`` stage: Hinton knowledge distillation against the true labels."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..engine.errors import StageError
from ..engine.specs import ModelSpec, build_model
from ..engine.stage import Context, Stage


class DistillStage(Stage):
    """Train the current model (the student) to match a teacher's softened outputs and the labels.

    Loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``.
    Weights that are exactly zero when the stage starts (pruned) stay zero.
    """

    type: Literal["distill"] = "distill"
    teacher: Literal["original"] | ModelSpec = "original"
    """``original`` (the model before the recipe) or a model spec (``target``, ``kwargs``, ``checkpoint``)."""
    epochs: int = Field(default=3, ge=1)
    """Passes over the train data."""
    lr: float = Field(default=1e-3, gt=0)
    """Adam learning rate."""
    temperature: float = Field(default=4.0, gt=0)
    """Softmax temperature of the soft-target term."""
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the soft-target term; ``1 - alpha`` weights cross-entropy on the true labels."""

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Fine-tune ``model`` in place and return it."""
        params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        if not params:
            raise StageError(self.label, "the model has no trainable float parameters (was it quantized? "
                             "put distill before quantize)")
        teacher = self._teacher(ctx).eval()
        masks = _zero_masks(model)
        optimizer = torch.optim.Adam(params, lr=self.lr)
        for epoch in range(self.epochs):
            loss = self._epoch(model, teacher, optimizer, masks, ctx)
            score = ctx.evaluate(model)
            ctx.log.info("  distill epoch %d/%d: loss %.4f, %s %.2f", epoch + 1, self.epochs, loss, ctx.metric_name, score)
        ctx.add_metric("train_loss", loss)
        return model.eval()

    def _teacher(self, ctx: Context) -> nn.Module:
        if isinstance(self.teacher, ModelSpec):
            return build_model(self.teacher, ctx.base_dir, field=f"{self.label}.teacher")
        return ctx.original

    def _epoch(self, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
               masks: dict[str, torch.Tensor], ctx: Context) -> float:
        student.train()
        total, batches = 0.0, 0
        for inputs, labels in ctx.data["train"]:
            with torch.no_grad():
                soft = teacher(inputs)
            loss = self.loss(student(inputs), soft, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _reapply(student, masks)
            total, batches = total + float(loss.detach()), batches + 1
        if batches == 0:
            raise StageError(self.label, "the train loader yielded no batch")
        return total / batches

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Soft-target KL at temperature T (scaled by T^2) mixed with hard-label cross-entropy."""
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean")
        return self.alpha * t * t * soft + (1 - self.alpha) * F.cross_entropy(student, labels)


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    # Trained weights are practically never exactly zero, so exact zeros mark pruned weights.
    return {
        name: p.detach() != 0
        for name, p in model.named_parameters()
        if p.dim() > 1 and bool((p == 0).any())
    }


def _reapply(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    if not masks:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
