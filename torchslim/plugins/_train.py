"""The training loop of the distill stage: optimizer, schedule, epochs, evaluation, best-epoch keeping.

Written once for one process and for many: under torchrun the trained module is wrapped in
DistributedDataParallel, rank 0 evaluates and broadcasts the score, so every process takes the
same keep/stop decisions and ends with the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ..engine import distributed
from ..engine.errors import StageError
from ..engine.stage import Context
from ._progress import Progress
from ._shard import TrainBatches

if TYPE_CHECKING:
    from .distill import DistillStage

#: (inputs, labels) -> (the loss to minimize, its feature-distillation part, detached).
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: Mean loss and mean feature-distillation part of one epoch.
EpochLoss = tuple[float, float]
Schedule = torch.optim.lr_scheduler.LambdaLR
#: SGD's momentum: the usual value for fine-tuning; not worth an option of its own.
SGD_MOMENTUM = 0.9


@dataclass
class Outcome:
    """What a training run reports."""

    train_loss: float
    feature_loss: float
    best_score: float
    best_epoch: int
    epochs_run: int
    steps: int


@dataclass
class Keeper:
    """Tracks the eval score epoch by epoch: the best weights (``keep: best``) and early stopping."""

    keep: Literal["best", "last"]
    higher: bool
    patience: int | None
    best: float = math.nan
    best_epoch: int = 0
    losses: dict[int, EpochLoss] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None
    stale: int = 0

    def update(self, epoch: int, loss: EpochLoss, score: float, model: nn.Module) -> None:
        """Record one epoch's loss and score; snapshot the weights if the score is the best yet."""
        self.losses[epoch] = loss
        if not self._improves(score):
            self.stale += 1
            return
        self.best, self.best_epoch, self.stale = score, epoch, 0
        if self.keep == "best":
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _improves(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if math.isnan(self.best):
            return True
        return score > self.best if self.higher else score < self.best

    @property
    def stop(self) -> bool:
        """Whether ``patience`` epochs passed without a better score."""
        return self.patience is not None and self.stale >= self.patience

    def finish(self, model: nn.Module, last_epoch: int) -> EpochLoss:
        """Load the kept weights into ``model``; return the train losses of the kept epoch."""
        if self.keep == "best" and self.state is not None:
            model.load_state_dict(self.state)
            return self.losses[self.best_epoch]
        return self.losses[last_epoch]


def make_optimizer(stage: DistillStage, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer the stage names, over ``params``."""
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.lr, momentum=SGD_MOMENTUM, weight_decay=stage.weight_decay)
    kind = torch.optim.AdamW if stage.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=stage.lr, weight_decay=stage.weight_decay)


def make_schedule(stage: DistillStage, optimizer: torch.optim.Optimizer, total: int | None) -> Schedule | None:
    """Cosine decay from ``lr`` to zero over ``total`` steps, or None for a constant rate."""
    if stage.schedule == "constant":
        return None
    if total is None:
        raise StageError(stage.label, "schedule: cosine needs the number of steps: the train loader has no "
                         "length, so set max_steps")
    return Schedule(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def total_steps(stage: DistillStage, per_epoch: int | None) -> int | None:
    """Optimizer steps the run will take at most (None if the loader has no length and no max_steps)."""
    if per_epoch is None:
        return stage.max_steps
    planned = per_epoch * stage.epochs
    return min(planned, stage.max_steps) if stage.max_steps else planned


def wrap(trainee: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``trainee`` when several processes train together."""
    if distributed.world_size() <= 1:
        return trainee
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(trainee, device_ids=[device] if device.type == "cuda" else None)


def fit(stage: DistillStage, trainee: nn.Module, student: nn.Module, batches: TrainBatches,
        loss_fn: LossFn, ctx: Context, after_step: Callable[[], None]) -> Outcome:
    """Train ``trainee`` (the student and its projections) for the stage's epochs; evaluate ``student`` after each."""
    params = [p for p in trainee.parameters() if p.requires_grad]
    optimizer = make_optimizer(stage, params)
    total = total_steps(stage, batches.length())
    schedule = make_schedule(stage, optimizer, total)
    progress = Progress(stage.label, ctx.log, ctx.metric_name, total, enabled=distributed.is_main())
    keeper = Keeper(stage.keep, stage.better == "higher", stage.patience)
    steps, epoch = 0, 0
    try:
        for epoch in range(1, stage.epochs + 1):
            batches.set_epoch(epoch)
            trainee.train()
            loss, steps = _epoch(stage, trainee, params, optimizer, schedule, batches, loss_fn, ctx,
                                 after_step, progress, epoch, steps)
            distributed.sync_buffers(student)
            score = _evaluate(student, ctx)
            keeper.update(epoch, loss, score, student)
            progress.epoch(epoch, stage.epochs, loss[0], score, keeper.best)
            if keeper.stop or (stage.max_steps is not None and steps >= stage.max_steps):
                break
    finally:
        progress.close()
    train_loss, features = keeper.finish(student, epoch)
    return Outcome(train_loss, features, keeper.best, keeper.best_epoch, epoch, steps)


def _epoch(stage: DistillStage, trainee: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
           schedule: Schedule | None, batches: TrainBatches, loss_fn: LossFn, ctx: Context,
           after_step: Callable[[], None], progress: Progress, epoch: int, steps: int) -> tuple[EpochLoss, int]:
    """One pass over this process's batches; returns the mean losses over every process and the step count."""
    total, feature_total, batches_seen = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device), 0
    for inputs, labels in batches:
        loss, feature = loss_fn(inputs.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if stage.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        after_step()
        total, feature_total = total + loss.detach(), feature_total + feature
        batches_seen, steps = batches_seen + 1, steps + 1
        progress.step(epoch, stage.epochs, steps, loss.detach())
        if stage.max_steps is not None and steps >= stage.max_steps:
            break
    if batches_seen == 0:
        raise StageError(stage.label, "the train loader yielded no batch")
    mean = distributed.mean_float(float(total) / batches_seen, ctx.device)
    if not math.isfinite(mean):
        raise StageError(stage.label, f"lr: the training loss became {mean} in epoch {epoch}; lower lr or set grad_clip")
    return (mean, distributed.mean_float(float(feature_total) / batches_seen, ctx.device)), steps


def _evaluate(student: nn.Module, ctx: Context) -> float:
    """The eval metric, computed once on rank 0 and shared, so every process decides alike."""
    score = ctx.evaluate(student) if distributed.is_main() else math.nan
    return distributed.broadcast_float(score, ctx.device)
