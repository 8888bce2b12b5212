"""The one training loop and the one zero keeper, on tiny real models: schedules, keep best, masks."""

from __future__ import annotations

import copy
import itertools
import logging
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import StageError
from torchslim.examples import digits
from torchslim.plugins._masks import ZeroMasks
from torchslim.plugins._shard import TrainBatches
from torchslim.plugins._train import Job, TrainPlan, finetune, fit, make_optimizer, make_schedule
from torchslim.plugins.distill import DistillStage

from .conftest import make_ctx


def train_loss(model: nn.Module, loader: Any) -> float:
    """Mean cross-entropy of ``model`` over ``loader``."""
    with torch.no_grad():
        return float(torch.stack([F.cross_entropy(model(x), y) for x, y in loader]).mean())


def labels_job(model: nn.Module, loader: Any, trainee: nn.Module | None = None, masks: ZeroMasks | None = None) -> Job:
    """A job that trains ``model`` (through ``trainee``) on cross-entropy over ``loader``, in the loader's order."""

    def loss_fn(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.cross_entropy(model(inputs), labels), torch.zeros(())

    return Job(
        "train",
        model,
        TrainBatches(loader, seed=None),
        loss_fn,
        torch.device("cpu"),
        trainee or model,
        after_step=masks.reapply if masks is not None else None,
    )


def prune_smallest(weight: torch.Tensor, amount: float) -> None:
    """Zero the ``amount`` smallest-magnitude entries of ``weight``, in place."""
    with torch.no_grad():
        cut = weight.abs().flatten().kthvalue(int(amount * weight.numel())).values
        weight.mul_(weight.abs() > cut)


@pytest.mark.parametrize("schedule", ["constant", "cosine"], ids=["constant", "cosine"])
def test_fit_lowers_the_loss(flat: dict, schedule: str) -> None:
    torch.manual_seed(0)
    model = digits.mlp(hidden=16)
    before = train_loss(model, flat["train"])
    plan = TrainPlan(epochs=3, lr=1e-2, schedule=schedule, evaluate=False)
    outcome = fit(plan, labels_job(model, flat["train"]))
    assert outcome.epochs_run == 3 and outcome.steps == 3 * len(flat["train"])
    assert outcome.train_loss < 0.5 * before
    assert train_loss(model, flat["train"]) < 0.5 * before


def test_cosine_schedule_decays_to_zero_over_the_planned_steps() -> None:
    param = nn.Parameter(torch.zeros(2))
    plan = TrainPlan(lr=0.1, schedule="cosine")
    optimizer = make_optimizer(plan, [param])
    schedule = make_schedule(plan, "train", optimizer, total=4)
    assert schedule is not None
    rates = []
    for _ in range(4):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[1] == pytest.approx(0.05) and rates[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("keep", "kept"), [("best", 2), ("last", 3)], ids=["best", "last"])
def test_keep_restores_the_chosen_epoch(flat: dict, keep: str, kept: int) -> None:
    scores = iter([40.0, 50.0, 80.0, 60.0])  # the first: the model before training (epoch 0)
    snapshots: list[dict[str, torch.Tensor]] = []

    def scripted(model: nn.Module) -> float:
        snapshots.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    torch.manual_seed(0)
    model = digits.mlp(hidden=16)
    few = list(itertools.islice(flat["train"], 3))
    outcome = fit(TrainPlan(epochs=3, lr=1e-2, keep=keep), labels_job(model, few), make_ctx(model, flat, scripted))
    assert (outcome.best_epoch, outcome.best_score, outcome.epochs_run) == (2, 80.0, 3)
    state = model.state_dict()
    for epoch, snapshot in enumerate(snapshots):
        assert all(torch.equal(state[k], snapshot[k]) for k in state) == (epoch == kept)


def test_keep_best_returns_the_untrained_model_when_no_epoch_beats_it(flat: dict) -> None:
    # The model before training is epoch 0: a candidate, and the one patience counts from.
    scores = iter([90.0, 50.0, 60.0, 95.0])
    torch.manual_seed(0)
    model = digits.mlp(hidden=16)
    before = copy.deepcopy(model.state_dict())
    few = list(itertools.islice(flat["train"], 3))
    ctx = make_ctx(model, flat, lambda _m: next(scores))
    outcome = fit(TrainPlan(epochs=4, lr=1e-2, keep="best", patience=2), labels_job(model, few), ctx)
    assert (outcome.best_epoch, outcome.best_score, outcome.epochs_run) == (0, 90.0, 2) and outcome.kept_input
    assert (outcome.start_score, outcome.last_score) == (90.0, 60.0) and math.isnan(outcome.train_loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finetune_keeps_zeros_of_layers_the_stage_did_not_prune(trained_mlp: nn.Module, flat: dict) -> None:
    # Issue 14: an earlier stage pruned layer 0, this one layer 2; fine-tuning must keep both patterns.
    model = copy.deepcopy(trained_mlp)
    prune_smallest(model[0].weight, 0.8)
    prune_smallest(model[2].weight, 0.5)
    zeros = {i: model[i].weight == 0 for i in (0, 2)}
    dense = model[4].weight.detach().clone()
    loss = finetune(model, flat["train"], 1, 1e-2, ZeroMasks.of(model))
    assert loss > 0 and not model.training
    for i, mask in zeros.items():
        assert bool((model[i].weight[mask] == 0).all()), f"layer {i} regrew pruned weights"
    assert not torch.equal(model[4].weight, dense)


def test_masking_only_the_pruned_layer_regrows_the_others(trained_mlp: nn.Module, flat: dict) -> None:
    # The counterpart of the test above: what prune's fine-tuning did before issue 14 was fixed.
    model = copy.deepcopy(trained_mlp)
    prune_smallest(model[0].weight, 0.8)
    prune_smallest(model[2].weight, 0.5)
    only_layer_2 = ZeroMasks(model, {"2.weight": model[2].weight.detach() != 0})
    finetune(model, flat["train"], 1, 1e-2, only_layer_2)
    assert float((model[0].weight == 0).float().mean()) < 0.3  # from 0.8 (inputs that are always 0 keep a few)


def test_zero_masks_take_weights_with_zeros_and_survive_wrapping(flat: dict) -> None:
    torch.manual_seed(0)
    model = digits.mlp(hidden=16)
    prune_smallest(model[2].weight, 0.5)
    with torch.no_grad():
        model[2].bias[0] = 0.0  # a zero bias is a value, not a pruned weight
    masks = ZeroMasks.of(model)
    assert list(masks.masks) == ["2.weight"] and len(masks) == 1
    wrapper = nn.ModuleDict({"inner": model})  # as DDP or distill's Trainee hold the model
    zeros = model[2].weight == 0
    fit(TrainPlan(lr=1e-2, evaluate=False), labels_job(model, flat["train"], trainee=wrapper, masks=masks))
    assert bool((model[2].weight[zeros] == 0).all()) and float(model[2].bias[0].detach()) != 0.0


def test_finetune_without_batches_is_nan_and_a_diverged_loss_names_finetune_lr(flat: dict) -> None:
    model = digits.mlp(hidden=16)
    assert torch.isnan(torch.tensor(finetune(model, [], 1, 1e-3, ZeroMasks.of(model))))
    poisoned = [(torch.full((4, 64), float("inf")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(StageError, match="stage prune-2: finetune_lr: the training loss became nan in epoch 1"):
        finetune(model, poisoned, 1, 1e-3, ZeroMasks.of(model), label="prune-2")


def test_an_unevaluated_run_logs_its_loss_without_a_score(flat: dict, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test")
    model = digits.mlp(hidden=16)
    few = list(itertools.islice(flat["train"], 2))
    outcome = fit(TrainPlan(epochs=2, evaluate=False), labels_job(model, few), make_ctx(model, flat))
    lines = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    assert len(lines) == 2 and all("accuracy" not in line for line in lines)
    assert lines[1].startswith("  train epoch 2/2: loss ") and outcome.best_epoch == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"evaluate": False, "keep": "best"}, "need evaluate"),
        ({"evaluate": False, "patience": 2}, "need evaluate"),
        ({"epochs": 0}, "epochs >= 1"),
    ],
    ids=["best-unevaluated", "patience-unevaluated", "no-epochs"],
)
def test_plans_the_loop_cannot_honour_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainPlan(**options)


def test_a_plan_takes_the_distill_stage_fields() -> None:
    stage = DistillStage(epochs=4, lr=0.01, optimizer="sgd", schedule="cosine", keep="best", patience=2, better="lower")
    assert TrainPlan.of(stage) == TrainPlan(
        epochs=4, lr=0.01, optimizer="sgd", schedule="cosine", keep="best", patience=2, better="lower"
    )
