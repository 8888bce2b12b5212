"""What stages must keep and put right: zeros are an invariant, BatchNorm statistics follow a prune.

Each training path runs after a prune; every weight that was exactly zero when it began is still
zero, no layer's zero count fell, and no removed channel came back (every shape is the same).
After a prune, the BatchNorm running statistics are re-estimated on the calibration data, weights
untouched, and the notes say so.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import torchslim
from torchslim import Registry
from torchslim.engine.stage import Context, Stage
from torchslim.examples import digits
from torchslim.plugins.distill import DistillStage, FeaturePair
from torchslim.plugins.prune import MagnitudePrune, NMPrune, PruneStage, StructuredPrune, WandaPrune

from .conftest import make_ctx

#: One torch thread for the whole module (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight (parameter of two or more dimensions) by name, detached copies."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() > 1}


def assert_zeros_kept(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Same layers and shapes; every zero of ``before`` still zero; no layer's zero count fell."""
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    for name, old in before.items():
        regrown = int(((old == 0) & (after[name] != 0)).sum())
        assert regrown == 0, f"{name}: {regrown} pruned weights moved away from zero"
        assert int((after[name] == 0).sum()) >= int((old == 0).sum()), name


def resnet() -> nn.Module:
    """A small residual CNN with BatchNorm, briefly trained: shortcuts, norms, a classifier."""
    return digits.resnet(width=8, blocks=1, train_epochs=1)


#: Prunes that leave zeros (or fewer channels) for the training paths below to keep.
PRUNES: dict[str, Callable[[], Stage]] = {
    "magnitude": lambda: MagnitudePrune(amount=0.8, scope="layer"),
    "structured+magnitude": lambda: MagnitudePrune(amount=0.6),  # after a structured prune: see setup
}

#: Training paths that begin after the prune: the distill stage in its forms, and every prune
#: method's fine-tuning between steps (which must keep the earlier prune's zeros too).
TRAINING: dict[str, Callable[[], Stage]] = {
    "distill-defaults": lambda: DistillStage(epochs=1, max_steps=6),
    "distill-sgd-decay-best": lambda: DistillStage(
        epochs=2, max_steps=6, optimizer="sgd", lr=0.1, weight_decay=0.01, keep="best"
    ),
    "distill-adamw-previous": lambda: DistillStage(
        epochs=1, max_steps=6, optimizer="adamw", weight_decay=0.1, teacher="previous"
    ),
    "distill-features": lambda: DistillStage(epochs=1, max_steps=6, features=[FeaturePair(student="stage1", teacher="stage1")]),
    "distill-labels-only": lambda: DistillStage(epochs=1, max_steps=6, alpha=0.0, lr=0.05),
    "magnitude-finetune": lambda: MagnitudePrune(amount=0.3, steps=2, finetune_epochs=1, finetune_lr=0.01),
    "nm-finetune": lambda: NMPrune(steps=2, finetune_epochs=1, finetune_lr=0.01),
    "structured-finetune": lambda: StructuredPrune(amount=0.3, steps=2, finetune_epochs=1, finetune_lr=0.01),
}


def pruned(kind: str, images: dict) -> tuple[nn.Module, Context]:
    """The small resnet after ``kind`` of prune, and its context."""
    model = resnet()
    ctx = make_ctx(model, images)
    if kind == "structured+magnitude":
        model = StructuredPrune(amount=0.5).apply(model, ctx.for_stage())
    torch.manual_seed(0)
    return PRUNES[kind]().apply(model, ctx.for_stage()), ctx


@pytest.fixture
def checked_finetune(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Check every fine-tuning between prune steps: the zeros it starts with, it ends with."""
    from torchslim.plugins import _train

    original, calls = _train.finetune, []

    def finetune(model: nn.Module, *args: Any, **kwargs: Any) -> float:
        before = weights(model)
        loss = original(model, *args, **kwargs)
        assert_zeros_kept(before, weights(model))
        calls.append(kwargs.get("label", "prune"))
        return loss

    monkeypatch.setattr(_train, "finetune", finetune)
    return calls


@pytest.mark.parametrize("prune", list(PRUNES), ids=list(PRUNES))
@pytest.mark.parametrize("training", list(TRAINING), ids=list(TRAINING))
def test_training_after_a_prune_keeps_its_zeros(images: dict, prune: str, training: str, checked_finetune: list[str]) -> None:
    model, ctx = pruned(prune, images)
    stage = TRAINING[training]()
    before = weights(model)
    out = stage.apply(model, ctx.for_stage())
    if isinstance(stage, PruneStage):
        assert checked_finetune, "the prune did not fine-tune between its steps"
    if not isinstance(stage, StructuredPrune):  # removing more channels changes shapes by design
        assert_zeros_kept(before, weights(out))


def test_wanda_finetune_keeps_an_earlier_prunes_zeros(trained_mlp: nn.Module, flat: dict, checked_finetune: list[str]) -> None:
    model = copy.deepcopy(trained_mlp)
    ctx = make_ctx(model, flat)
    MagnitudePrune(amount=0.7, scope="layer").apply(model, ctx.for_stage())
    before = weights(model)
    out = WandaPrune(amount=0.3, steps=2, finetune_epochs=1, finetune_lr=0.01).apply(model, ctx.for_stage())
    assert_zeros_kept(before, weights(out))


def test_qat_after_a_prune_keeps_its_zeros(images: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    qat = pytest.importorskip("torchslim.plugins.quantize.qat", reason="no quantization-aware training in this build")
    from torchslim.plugins.quantize import QuantizeStage

    original, checked = qat.fit, []

    def fit(plan: Any, job: Any, ctx: Any = None) -> Any:
        # The fake-quantized layers keep their float weights as parametrization originals: the zeros live there.
        before = weights(job.model)
        outcome = original(plan, job, ctx)
        assert_zeros_kept(before, weights(job.model))
        checked.append(job.label)
        return outcome

    monkeypatch.setattr(qat, "fit", fit)
    model, ctx = pruned("magnitude", images)
    stage = QuantizeStage.from_options(method="kbit", bits=4, train={"epochs": 1, "max_steps": 4})
    stage.apply(model, ctx.for_stage())
    assert checked, "the quantize stage did not train"


#: The gradual example of docs/prune.md ("Gradual pruning"), on the digits residual CNN.
GRADUAL = [
    {"type": "prune", "method": "structured", "amount": 0.5, "steps": 4, "finetune_epochs": 1, "round_to": 4},
    {"type": "prune", "amount": 0.9, "steps": 3, "finetune_epochs": 2, "finetune_lr": 0.0005},
    {"type": "prune", "method": "nm", "steps": 2, "finetune_epochs": 1},
]


def test_the_docs_gradual_example_ends_at_the_sparsity_its_stages_asked_for() -> None:
    recipe = {
        "name": "gradual",
        "seed": 0,
        "model": {"target": "torchslim.examples.digits:resnet", "kwargs": {"train_epochs": 5}},
        "data": {"target": "torchslim.examples.digits:loaders", "kwargs": {"image": True}},
        "metrics": {"latency": False},
        "stages": GRADUAL,
    }
    report = torchslim.run(recipe, registry=Registry.load(autoload=False))
    structured, magnitude, nm = (row.metrics for row in report.rows[1:])
    assert magnitude["pruned_sparsity"] == pytest.approx(0.9, abs=0.005)
    # The nm stage fine-tunes between its steps: it must not give back any of the 90%.
    assert nm["nonzero"] <= magnitude["nonzero"] and nm["sparsity"] >= magnitude["sparsity"] >= 0.88
    assert nm["pruned_sparsity"] >= 0.9 - 0.005 and nm["params"] == structured["params"]


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of every BatchNorm, by name."""
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("recalibrate", [True, False], ids=["recalibrated", "kept"])
def test_a_prune_re_estimates_batchnorm_statistics_on_the_calibration_data(images: dict, recalibrate: bool) -> None:
    model = resnet()
    ctx, stored = make_ctx(model, images).for_stage(), norm_state(model)
    torch.manual_seed(0)
    reference = MagnitudePrune(amount=0.8, scope="layer", recalibrate_bn=False).apply(copy.deepcopy(model), ctx.for_stage())
    out = MagnitudePrune(amount=0.8, scope="layer", recalibrate_bn=recalibrate).apply(model, ctx)
    assert weights(out).keys() == weights(reference).keys()
    assert all(torch.equal(w, weights(reference)[k]) for k, w in weights(out).items())  # the weights are the prune's
    after, batches = norm_state(out), len(images["calibration"])
    norms = [m for m in out.modules() if isinstance(m, nn.BatchNorm2d)]
    if recalibrate:
        assert ctx.metrics["recalibrated_norms"] == len(norms) == 6
        assert any(f"BatchNorm statistics of 6 layers re-estimated on {batches} calibration batches" in n for n in ctx.notes)
        assert all(int(v) == batches for k, v in after.items() if "num_batches" in k)
        assert not torch.equal(after["stem.1.running_var"], stored["stem.1.running_var"])
        assert all(m.momentum == 0.1 and not m.training for m in norms)  # put back as they were
    else:
        assert all(torch.equal(v, stored[k]) for k, v in after.items())
        assert "recalibrated_norms" not in ctx.metrics and not any("BatchNorm" in n for n in ctx.notes)


def test_recalibration_is_the_exact_average_over_the_calibration_batches(images: dict) -> None:
    from torchslim.plugins.prune._norms import recalibrate

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert recalibrate(model, images["calibration"], batches=2) == 2
    inputs = torch.cat([x for x, _ in itertools.islice(iter(images["calibration"]), 2)])
    with torch.no_grad():
        features = model[0](inputs)
    # Equal-sized batches: the cumulative average of the batch means is the mean over all inputs.
    assert torch.allclose(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert recalibrate(nn.Sequential(nn.Linear(2, 2)), images["calibration"]) == 0  # no BatchNorm: nothing to do
