"""The one training loop (optimizer, schedule, epochs, evaluation, best-epoch keeping) of every stage that trains.

Distill, prune's fine-tuning between steps (:func:`finetune`), quantization-aware training. Written
once for one process and for many: under torchrun the trained module is wrapped in DistributedDataParallel
(:func:`._shard.wrap`), rank 0 evaluates and broadcasts the score, so every process takes the same
keep/stop decisions and ends with the same weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import distributed
from ..engine.errors import StageError
from ..engine.stage import Batch, Context
from ._masks import ZeroMasks
from ._progress import EpochLoss, Keeper, Progress
from ._shard import TrainBatches

#: (inputs, labels) -> (the loss to minimize, its feature-distillation part, detached).
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Schedule = torch.optim.lr_scheduler.LambdaLR
#: SGD's momentum: the usual value for fine-tuning; not worth an option of its own.
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class TrainPlan:
    """How to train: the options of the loop, without the stage around them (user input is
    validated by the stage's config; this only refuses combinations the loop cannot honour)."""

    epochs: int = 1
    """Passes over the train data (at most: see ``max_steps`` and ``patience``)."""
    lr: float = 1e-3
    """Learning rate (the peak rate under ``cosine``)."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """``adam``, ``adamw`` or ``sgd`` (momentum 0.9)."""
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    """``cosine`` decays the rate to zero over the planned steps."""
    warmup: float = 0.0
    """Fraction of the planned steps over which the rate rises linearly from ``lr / ramp`` to ``lr``."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total."""
    grad_clip: float | None = None
    """Clip the gradients' global L2 norm to this value."""
    keep: Literal["last", "best"] = "last"
    """Weights returned: the last epoch's, or the best-scoring epoch's."""
    patience: int | None = None
    """Stop after this many epochs without a better score."""
    better: Literal["higher", "lower"] = "higher"
    """Whether a higher or a lower eval metric is better."""
    evaluate: bool = True
    """Evaluate after each epoch; False saves that pass (then keep is last and there is no patience)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or not 0 <= self.warmup < 1:
            raise ValueError(
                f"TrainPlan needs epochs >= 1, lr > 0 and 0 <= warmup < 1, not {self.epochs}, {self.lr} and {self.warmup}"
            )
        if not self.evaluate and (self.keep == "best" or self.patience is not None):
            raise ValueError("TrainPlan: keep best and patience choose by the eval metric, so they need evaluate")

    @classmethod
    def of(cls, options: object, lr: float | None = None) -> TrainPlan:
        """The plan from a stage config's fields of the same names (distill's), with ``lr`` instead of the
        config's when given (a rate the stage resolved); the others keep their defaults."""
        found = {f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)}
        return cls(**{**found, "lr": lr} if lr is not None else found)


@dataclass(frozen=True, eq=False)
class Job:
    """What one run trains and on what: the runtime side of :func:`fit` (the options are a TrainPlan)."""

    label: str
    """The stage's label: errors and progress lines start with it."""
    model: nn.Module
    """The model evaluated after each epoch and kept (``keep: best``)."""
    batches: TrainBatches
    loss_fn: LossFn
    device: torch.device
    """Where the batches are moved before the loss."""
    trainee: nn.Module
    """What the optimizer trains: ``model``, or a module holding it (with projections, in DDP)."""
    after_step: Callable[[], None] | None = None
    """Called after every optimizer step (e.g. :meth:`ZeroMasks.reapply`)."""


class NoBatches(StageError):
    """The train loader yielded no batch."""


class Diverged(StageError):
    """The training loss became NaN or infinite."""

    def __init__(self, stage: str, loss: float, epoch: int) -> None:
        self.loss, self.epoch = loss, epoch
        super().__init__(stage, f"lr: the training loss became {loss} in epoch {epoch}; lower lr or set grad_clip")


@dataclass
class Outcome:
    """What a training run reports."""

    train_loss: float
    """Mean loss of the kept epoch (NaN when the untrained model was kept: it had no training loss)."""
    feature_loss: float
    best_score: float
    """The best score, the model before training included (NaN without evaluation)."""
    best_epoch: int
    """The epoch of ``best_score``: 0 is the model before training."""
    epochs_run: int
    steps: int
    start_score: float = math.nan
    """The score of the model before training."""
    last_score: float = math.nan
    """The score of the last epoch run."""

    @property
    def kept_input(self) -> bool:
        """Whether no epoch beat the model before training (``keep: best`` then returned it)."""
        return self.best_epoch == 0 and not math.isnan(self.best_score)


def make_optimizer(plan: TrainPlan, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer the plan names, over ``params``."""
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.lr, momentum=SGD_MOMENTUM, weight_decay=plan.weight_decay)
    kind = torch.optim.AdamW if plan.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=plan.lr, weight_decay=plan.weight_decay)


def make_schedule(plan: TrainPlan, label: str, optimizer: torch.optim.Optimizer, total: int | None) -> Schedule | None:
    """A linear warm-up over ``plan.warmup`` of ``total`` steps, then cosine decay to zero (or the
    constant rate); None for a constant rate without warm-up."""
    if plan.schedule == "constant" and not plan.warmup:
        return None
    if total is None:
        what = "schedule: cosine" if plan.schedule == "cosine" else "warmup"
        raise StageError(
            label,
            f"{what} needs the number of steps: the train loader has no length, so set "
            "max_steps (or schedule: constant and warmup: 0)",
        )
    return Schedule(optimizer, _factor(plan, total))


def _factor(plan: TrainPlan, total: int) -> Callable[[int], float]:
    """The multiplier of ``lr`` at each step: the shape of the schedule."""
    ramp = max(1, round(plan.warmup * total)) if plan.warmup else 0
    span = max(1, total - ramp)

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        if plan.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step - ramp, span) / span))

    return factor


def total_steps(plan: TrainPlan, per_epoch: int | None) -> int | None:
    """Optimizer steps the run will take at most (None if the loader has no length and no max_steps)."""
    if per_epoch is None:
        return plan.max_steps
    planned = per_epoch * plan.epochs
    return min(planned, plan.max_steps) if plan.max_steps else planned


def fit(plan: TrainPlan, job: Job, ctx: Context | None = None) -> Outcome:
    """Train ``job`` as ``plan`` says; after each epoch, score ``job.model`` with ``ctx.select_score``
    (the validation data when there is some), which ``keep: best`` and ``patience`` choose by.

    Without ``ctx`` the run logs nothing and ``plan.evaluate`` must be False.
    """
    if plan.evaluate and ctx is None:
        raise ValueError("fit: evaluating needs a Context")
    run = _Run.start(plan, job, ctx)
    keeper = Keeper(plan.keep, plan.better == "higher", plan.patience)
    # The model as received is a candidate too: training that only makes it worse must not win (issue 23).
    keeper.start(_evaluate(plan, job, ctx), job.model)
    epoch = 0
    try:
        for epoch in range(1, plan.epochs + 1):
            loss = run.epoch(epoch)
            score = _evaluate(plan, job, ctx)
            keeper.update(epoch, loss, score, job.model)
            run.progress.epoch(epoch, plan.epochs, loss[0], score if plan.evaluate else None, keeper.best)
            if keeper.stop or run.out_of_steps:
                break
    finally:
        run.progress.close()
    train_loss, features = keeper.finish(job.model, epoch)
    return Outcome(train_loss, features, keeper.best, keeper.best_epoch, epoch, run.steps, keeper.start_score, keeper.last_score)


@dataclass
class _Run:
    """The state one run carries from step to step."""

    plan: TrainPlan
    job: Job
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: Schedule | None
    progress: Progress
    steps: int = 0

    @classmethod
    def start(cls, plan: TrainPlan, job: Job, ctx: Context | None) -> _Run:
        params = [p for p in job.trainee.parameters() if p.requires_grad]
        optimizer = make_optimizer(plan, params)
        total = total_steps(plan, job.batches.length())
        log = ctx.log if ctx is not None else logging.getLogger("torchslim")
        progress = Progress(
            job.label, log, ctx.metric_name if ctx is not None else "", total, enabled=ctx is not None and distributed.is_main()
        )
        return cls(plan, job, params, optimizer, make_schedule(plan, job.label, optimizer, total), progress)

    @property
    def out_of_steps(self) -> bool:
        """Whether ``max_steps`` is reached."""
        return self.plan.max_steps is not None and self.steps >= self.plan.max_steps

    def epoch(self, epoch: int) -> EpochLoss:
        """One pass over this process's batches; the mean losses over every process."""
        job, device = self.job, self.job.device
        job.batches.set_epoch(epoch)
        job.trainee.train()
        total, feature_total, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for inputs, labels in job.batches:
            loss, feature = self.step(inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            total, feature_total, seen = total + loss, feature_total + feature, seen + 1
            self.progress.step(epoch, self.plan.epochs, self.steps, loss)
            if self.out_of_steps:
                break
        if seen == 0:
            raise NoBatches(job.label, "the train loader yielded no batch")
        mean = _mean(job, float(total) / seen)
        if not math.isfinite(mean):
            raise Diverged(job.label, mean, epoch)
        return mean, _mean(job, float(feature_total) / seen)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; the loss (detached) and its feature part."""
        loss, feature = self.job.loss_fn(inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.plan.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.plan.grad_clip)
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        if self.job.after_step is not None:
            self.job.after_step()
        self.steps += 1
        return loss.detach(), feature


def _mean(job: Job, value: float) -> float:
    """``value`` averaged over the processes that share the batches (itself in one process)."""
    return distributed.mean_float(value, job.device) if job.batches.shared else value


def _evaluate(plan: TrainPlan, job: Job, ctx: Context | None) -> float:
    """The metric to choose by (validation data when there is some, else eval), computed once on
    rank 0 and shared, so every process decides alike."""
    if job.batches.shared:
        distributed.sync_buffers(job.model)  # the weights returned must agree, evaluated or not
    if not plan.evaluate or ctx is None:
        return math.nan
    score = ctx.select_score(job.model) if distributed.is_main() or not job.batches.shared else math.nan
    return distributed.broadcast_float(score, job.device) if job.batches.shared else score


def finetune(
    model: nn.Module, loader: Iterable[Batch], epochs: int, lr: float, masks: ZeroMasks, *, label: str = "prune"
) -> float:
    """Train ``model`` in place on cross-entropy with Adam, keeping ``masks``' zeros; no evaluation.

    Prune's fine-tuning between steps: the loader's own order, in this process only. Returns
    the mean loss of the last epoch, NaN if the loader yielded no batch (the caller names its option).
    """
    device = next(model.parameters()).device  # the runner moved the model; the loader's batches may be on CPU
    zero = torch.zeros((), device=device)

    def loss_fn(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.cross_entropy(model(inputs), labels), zero

    job = Job(label, model, TrainBatches(loader, seed=None), loss_fn, device, model, after_step=masks.reapply)
    try:
        return fit(TrainPlan(epochs=epochs, lr=lr, evaluate=False), job).train_loss
    except NoBatches:
        return math.nan
    except Diverged as exc:
        raise StageError(
            label, f"finetune_lr: the training loss became {exc.loss} in epoch {exc.epoch}; lower finetune_lr"
        ) from None
    finally:
        model.eval()
