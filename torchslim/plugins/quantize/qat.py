"""Quantization-aware training of the low-bit methods: fake quantization with a straight-through estimator.

The chosen layers' weights are rounded to their format in every forward pass (a parametrization
of ``weight``; binary activations: their inputs binarized by a forward pre-hook, :mod:`.activations`)
while the gradient passes through unchanged to the float weights, which the one
training loop (:func:`.._train.fit`) updates, distilling from the float model by default. Weights
that are exactly zero when training starts (pruned) stay zero. The trained float weights are then
converted like post-training quantization would convert them.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from ...engine.errors import StageError
from ...engine.stage import Context
from .._kd import hinton_loss
from .._masks import ZeroMasks
from .._shard import TrainBatches
from .._train import Job, Outcome, TrainPlan, fit
from .activations import binary_inputs
from .formats import Format, fake_quantize


class QatOptions(BaseModel):
    """How a low-bit method trains with fake quantization before converting (quantization-aware training)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    epochs: int = Field(default=3, ge=1)
    """Passes over the train data."""
    lr: float = Field(default=1e-3, gt=0)
    """Learning rate (the peak rate under ``cosine``)."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """``adam``, ``adamw`` or ``sgd`` (momentum 0.9)."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """``cosine`` decays the rate to zero over the planned steps; ``constant`` keeps it."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps in total (null: no limit)."""
    grad_clip: float | None = Field(default=None, gt=0)
    """Clip the gradients' global L2 norm to this value (null: no clipping)."""
    teacher: Literal["original", "previous", "none"] = "original"
    """Distill from ``original`` (the float model before the recipe), ``previous`` (the model before
    this stage), or ``none`` (cross-entropy on the labels only)."""
    temperature: float = Field(default=4.0, gt=0)
    """Softmax temperature of the soft-target term."""
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the soft-target term; ``1 - alpha`` weights cross-entropy on the labels."""
    keep: Literal["last", "best"] = "last"
    """Weights converted: those of the last epoch, or of the epoch with the best eval metric (optimistic)."""


class _FakeQuant(nn.Module):
    """The parametrization: the weight as its format would store it, straight-through in backward."""

    def __init__(self, fmt: Format) -> None:
        super().__init__()
        self.fmt = fmt

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` rounded to the format (gradient: identity)."""
        return fake_quantize(weight, self.fmt)


def train(label: str, options: QatOptions, model: nn.Module, formats: dict[str, Format], ctx: Context) -> Outcome:
    """Train ``model`` in place with the ``formats`` layers fake-quantized; their float weights stay plain after."""
    layers = dict(model.named_modules())
    if not any(layers[n].weight.requires_grad and layers[n].weight.is_floating_point() for n in formats):
        raise StageError(
            label,
            f"train: none of the {len(formats)} chosen layers has a trainable float weight "
            "(frozen with requires_grad=False?); nothing to train",
        )
    seed = int(torch.randint(2**31 - 1, (1,)))  # from the runner's per-stage generator: reproducible order
    teacher = _teacher(options, model, ctx)
    model.to(ctx.device)
    for name, fmt in formats.items():
        parametrize.register_parametrization(layers[name], "weight", _FakeQuant(fmt))
    masks = ZeroMasks.of(model)  # after the parametrizations: the masks name the trained float tensors
    binarized = [layers[n] for n, f in formats.items() if f.activations == "binary"]
    try:
        with binary_inputs(binarized):
            return fit(TrainPlan.of(options), _job(label, options, model, teacher, masks, seed, ctx), ctx)
    finally:
        for name in formats:
            parametrize.remove_parametrizations(layers[name], "weight", leave_parametrized=False)
        model.eval()


def _job(
    label: str, options: QatOptions, model: nn.Module, teacher: nn.Module | None, masks: ZeroMasks, seed: int, ctx: Context
) -> Job:
    zero = torch.zeros((), device=ctx.device)

    def loss_fn(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = None
        if teacher is not None:
            with torch.no_grad():
                target = teacher(inputs)
        return hinton_loss(model(inputs), target, labels, options.temperature, options.alpha), zero

    return Job(label, model, TrainBatches(ctx.data["train"], seed), loss_fn, ctx.device, model, after_step=masks.reapply)


def _teacher(options: QatOptions, model: nn.Module, ctx: Context) -> nn.Module | None:
    if options.teacher == "none" or options.alpha == 0:
        return None
    source = ctx.original if options.teacher == "original" else model
    # A copy: the original is shared with later stages, and ``previous`` is about to be trained.
    return copy.deepcopy(source).to(ctx.device).eval()
