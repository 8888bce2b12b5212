"""Built-in ``distill`` stage: knowledge distillation toward a teacher, against the true labels.

Logit distillation (Hinton) plus optional feature distillation on named layers; fine-tunes the
current model (pruned weights stay zero) or trains a new, smaller student built from a model
spec. One process, or several under ``torchrun`` (DistributedDataParallel).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..engine import distributed
from ..engine.errors import StageError
from ..engine.specs import ModelSpec, build_model
from ..engine.stage import Context, Stage
from ._kd import FeatureLoss, Taps, Trainee, feature_loss, hinton_loss, probe_projections
from ._masks import ZeroMasks
from ._shard import TrainBatches, wrap
from ._train import Job, Outcome, TrainPlan, fit

#: Hooks on the student and the teacher, and the student's projections (None, None, [] without features).
Tapped = tuple[Taps | None, Taps | None, list[nn.Module]]
#: Students with at least this many trainable parameters get LARGE_LR by default, smaller ones SMALL_LR:
#: measured on four small models and on a pretrained MiniLM (docs/distill.md, "The defaults").
LARGE_STUDENT = 1_000_000
SMALL_LR = 1e-2
LARGE_LR = 3e-4


class FeaturePair(BaseModel):
    """One feature-distillation term: a student layer's output pulled toward a teacher layer's."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    student: str = Field(min_length=1)
    """Layer name in the student, as ``model.named_modules()`` gives it (e.g. ``stage1.0``)."""
    teacher: str = Field(min_length=1)
    """Layer name in the teacher. If its width differs, a learned projection (Linear, or a 1x1
    convolution) maps the student's output to it; the projection is trained with the student and
    not part of the returned model."""
    weight: float = Field(default=1.0, gt=0)
    """Multiplier of this term in the loss."""
    loss: FeatureLoss = "mse"
    """``mse`` (mean squared error) or ``cosine`` (1 - cosine similarity of the flattened outputs)."""


class DistillStage(Stage):
    """Train a student to match a teacher's softened outputs (and chosen features) and the true labels.

    Loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)`` plus
    ``weight * distance`` for each feature pair. Weights of the current model that are exactly
    zero when the stage starts (pruned) stay zero.
    """

    type: Literal["distill"] = "distill"
    teacher: Literal["original", "previous"] | ModelSpec = "original"
    """``original`` (the model before the recipe), ``previous`` (the model before this stage), or a
    model spec (``target``, ``kwargs``, ``checkpoint``)."""
    student: Literal["current"] | ModelSpec = "current"
    """``current`` (fine-tune the model the previous stages produced) or a model spec for a new,
    smaller architecture that replaces it (saved models rebuild it from the spec)."""
    epochs: int = Field(default=3, ge=1)
    """Passes over the train data (at most: see ``max_steps`` and ``patience``)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps in total (null: no limit)."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """``adam``, ``adamw`` (decoupled weight decay) or ``sgd`` (momentum 0.9)."""
    lr: float | None = Field(default=None, gt=0)
    """Learning rate (the peak rate under ``cosine``). Null: 0.01 for a student of fewer than a million
    trainable parameters, 3e-4 for a larger one, where 0.01 wrecks a pretrained network (the row records
    the rate used as ``lr``)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Weight decay of the optimizer."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """``cosine`` decays the learning rate to zero over the planned steps (a train loader without a
    length then needs ``max_steps``); ``constant`` keeps it."""
    warmup: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of the planned steps over which the learning rate rises linearly to ``lr`` (0: none)."""
    grad_clip: float | None = Field(default=None, gt=0)
    """Clip the gradients' global L2 norm to this value (null: no clipping)."""
    output_loss: Literal["kl", "mse", "cosine"] = "kl"
    """How the student's outputs are compared with the teacher's: ``kl`` (soft targets at ``temperature``,
    for class logits), or ``mse`` / ``cosine`` (1 - cosine similarity per sample), for outputs that are not
    logits (embeddings, regression); with these the ``1 - alpha`` term compares the outputs with the
    labels the same way, so the labels must have the outputs' shape."""
    temperature: float = Field(default=4.0, gt=0)
    """Softmax temperature of the soft-target term (``output_loss: kl``)."""
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the teacher term; ``1 - alpha`` weights the labels' term (cross-entropy for ``kl``)
    (``alpha: 0`` with no ``features`` is plain fine-tuning on the labels: no teacher is run)."""
    features: list[FeaturePair] = Field(default_factory=list)
    """Feature-distillation pairs ``{student, teacher, weight, loss}``, taken by forward hooks."""
    keep: Literal["last", "best"] = "last"
    """Weights returned: those of the last epoch, or of the epoch with the best metric on the
    ``validation`` data (without validation data: on the eval data the summary then reports, so its
    figure is optimistic; the notes say which)."""
    patience: int | None = Field(default=None, ge=1)
    """Stop after this many epochs without a better metric (on the validation data when there is
    some, else the eval data; null: run every epoch)."""
    better: Literal["higher", "lower"] = "higher"
    """Whether a higher or a lower eval metric is better (``lower`` for a loss or an error rate)."""

    def loss(self, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """The output term: soft-target KL at temperature T (scaled by T^2) mixed with hard-label
        cross-entropy, or (``output_loss`` mse / cosine) the distance to the teacher's outputs mixed with
        the distance to the labels."""
        if self.output_loss == "kl":
            return hinton_loss(student, teacher, labels, self.temperature, self.alpha)
        total = student.new_zeros(())
        if self.alpha > 0 and teacher is not None:
            total = total + self.alpha * feature_loss(self.output_loss, student, teacher)
        if self.alpha < 1:
            if labels.shape != student.shape:
                raise StageError(
                    self.label,
                    f"output_loss {self.output_loss} with alpha < 1 compares the outputs with "
                    f"the labels, but the labels' shape {tuple(labels.shape)} is not the outputs' "
                    f"{tuple(student.shape)}: set alpha: 1, or output_loss: kl for class labels",
                )
            total = total + (1 - self.alpha) * feature_loss(self.output_loss, student, labels.to(student.dtype))
        return total

    @property
    def needs_teacher(self) -> bool:
        """Whether any loss term looks at the teacher."""
        return self.alpha > 0 or bool(self.features)

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Train the student (``model`` in place, or a new one) and return it."""
        # Drawn first, from the generator the runner seeded for this stage: the data order
        # depends on the recipe seed and the stage's position only.
        seed = int(torch.randint(2**31 - 1, (1,)))
        distributed.init_for_stage(ctx.device)
        student = self._student(model, ctx)  # first: a quantized model fails before a teacher is built
        teacher = self._teacher(model, ctx) if self.needs_teacher else None
        masks = ZeroMasks.of(student) if self.student == "current" else None
        taps = self._taps(student, teacher, ctx)
        plan = TrainPlan.of(self, lr=self.lr if self.lr is not None else default_lr(student))
        try:
            outcome = self._train(student, teacher, taps, masks, seed, ctx, plan)
        finally:
            _remove([tap for tap in taps[:2] if isinstance(tap, Taps)])
        ctx.add_metric("lr", plan.lr)
        self._report(outcome, ctx, plan.lr)
        return student.eval()

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Rebuild the student from its spec when this stage replaced the model (weights come from the file)."""
        if "student" not in record:
            return model
        spec = ModelSpec.model_validate(record["student"])
        return build_model(spec, None, field=f"{self.label}.student")

    def _teacher(self, model: nn.Module, ctx: Context) -> nn.Module:
        if isinstance(self.teacher, ModelSpec):
            return build_model(self.teacher, ctx.base_dir, field=f"{self.label}.teacher").to(ctx.device).eval()
        if self.teacher == "previous" and self.student == "current":
            return copy.deepcopy(model).to(ctx.device).eval()  # the student is about to change in place
        source = model if self.teacher == "previous" else ctx.original
        return _on_device(source, ctx.device).eval()

    def _student(self, model: nn.Module, ctx: Context) -> nn.Module:
        if isinstance(self.student, ModelSpec):
            student = build_model(self.student, ctx.base_dir, field=f"{self.label}.student")
            ctx.record_for_restore(student=self.student.model_dump(mode="json", exclude={"checkpoint"}))
        else:
            student = model
        if not any(p.requires_grad and p.is_floating_point() for p in student.parameters()):
            raise StageError(
                self.label, "the model has no trainable float parameters (was it quantized? put distill before quantize)"
            )
        return student.to(ctx.device)

    def _taps(self, student: nn.Module, teacher: nn.Module | None, ctx: Context) -> Tapped:
        if not self.features or teacher is None:
            return None, None, []
        taps = [_tap(self, student, "student")]
        try:
            taps.append(_tap(self, teacher, "teacher"))
            example = ctx.example_inputs[:2].to(ctx.device)
            projections = probe_projections(student, teacher, taps[0], taps[1], example)
        except (ValueError, TypeError) as exc:
            _remove(taps)
            raise StageError(self.label, str(exc)) from None
        except BaseException:
            _remove(taps)
            raise
        return taps[0], taps[1], [p.to(ctx.device) for p in projections]

    def _train(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        taps: Tapped,
        masks: ZeroMasks | None,
        seed: int,
        ctx: Context,
        plan: TrainPlan,
    ) -> Outcome:
        student_taps, teacher_taps, projections = taps
        trainee = Trainee(student, student_taps, projections)
        wrapped = wrap(trainee, ctx.device)
        batches = TrainBatches(ctx.data["train"], seed, distributed.world_size(), distributed.rank())

        def loss_fn(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, features = wrapped(inputs)
            part = torch.zeros((), device=logits.device)
            if teacher is None:
                return self.loss(logits, None, labels), part
            with torch.no_grad():
                target = teacher(inputs)
            targets = teacher_taps.take() if teacher_taps is not None else []
            for pair, s, t in zip(self.features, features, targets, strict=True):
                part = part + pair.weight * feature_loss(pair.loss, s, t)
            return self.loss(logits, target, labels) + part, part.detach()

        job = Job(
            self.label, student, batches, loss_fn, ctx.device, wrapped, after_step=masks.reapply if masks is not None else None
        )
        return fit(plan, job, ctx)

    def _report(self, outcome: Outcome, ctx: Context, lr: float) -> None:
        ctx.add_metric("train_loss", outcome.train_loss)  # NaN (not measured) when the input was kept
        if self.features:
            ctx.add_metric("feature_loss", outcome.feature_loss)
        ctx.add_metric(f"best_{ctx.metric_name}", outcome.best_score)
        ctx.add_metric("best_epoch", outcome.best_epoch)
        ctx.add_metric("epochs_run", outcome.epochs_run)
        self._selection_note(ctx)
        self._kept_note(outcome, ctx, lr)
        if distributed.is_main():
            kept = f"kept epoch {outcome.best_epoch}" if self.keep == "best" else "kept the last epoch"
            ctx.log.info(
                "  %s: %d epochs, %d steps, best %s %.2f at epoch %d (0: as received), %s",
                self.label,
                outcome.epochs_run,
                outcome.steps,
                ctx.metric_name,
                outcome.best_score,
                outcome.best_epoch,
                kept,
            )

    def _kept_note(self, outcome: Outcome, ctx: Context, lr: float) -> None:
        """Say so when the stage returns the model it received (keep: best), or one that scores worse (keep: last)."""
        metric, split = ctx.metric_name, ctx.selection_split
        given = "the model it received" if self.student == "current" else "the student as built (untrained)"
        if self.keep == "best" and outcome.kept_input:
            ctx.keep_input()
            text = (
                f"{self.label}: kept {given} (keep: best): no epoch beat its {metric} of "
                f"{outcome.start_score:.2f} on the {split} data (last epoch: {outcome.last_score:.2f}); "
                f"an lr below {lr:g} may help"
            )
        elif self.keep == "last" and _worse(self, outcome.last_score, outcome.start_score):
            text = (
                f"{self.label}: returned the last epoch (keep: last), whose {metric} of {outcome.last_score:.2f} "
                f"on the {split} data is worse than the {outcome.start_score:.2f} of {given} "
                f"(keep: best would have returned that one); an lr below {lr:g} may help"
            )
        else:
            return
        ctx.note(text)
        if distributed.is_main():
            ctx.log.warning("%s", text)

    def _selection_note(self, ctx: Context) -> None:
        """Say which data chose the epoch (keep: best) or the stop (patience), and which reports."""
        chosen = [what for what, on in (("keep: best", self.keep == "best"), ("patience", self.patience is not None)) if on]
        if not chosen:
            return
        ctx.add_metric("selected_on", ctx.selection_split)
        if ctx.validate is not None:
            ctx.note(f"{self.label}: {' and '.join(chosen)} chose on the validation data; the summary reports the eval data")
        else:
            ctx.note(
                f"{self.label}: {' and '.join(chosen)} chose on the eval data, the same data the summary "
                f"reports (an optimistic figure); a 'validation' loader from the data factory separates them"
            )


def default_lr(student: nn.Module) -> float:
    """The peak learning rate when the recipe gives none: SMALL_LR below LARGE_STUDENT trainable parameters."""
    count = sum(p.numel() for p in student.parameters() if p.requires_grad and p.is_floating_point())
    return LARGE_LR if count >= LARGE_STUDENT else SMALL_LR


def _worse(stage: DistillStage, score: float, other: float) -> bool:
    """Whether ``score`` is strictly worse than ``other`` by the stage's ``better`` (False if either is NaN)."""
    return score < other if stage.better == "higher" else score > other


def _tap(stage: DistillStage, model: nn.Module, owner: Literal["student", "teacher"]) -> Taps:
    try:
        return Taps(model, [getattr(pair, owner) for pair in stage.features], owner)
    except LookupError as exc:
        raise StageError(stage.label, exc.args[0]) from None


def _remove(taps: list[Taps]) -> None:
    for tap in taps:
        tap.remove()


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    # ctx.original must not be moved in place: other stages (and the runner) still use it.
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device == device for t in tensors):
        return module
    return copy.deepcopy(module).to(device)
