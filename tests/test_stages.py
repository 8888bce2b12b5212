"""Each built-in stage on a tiny real model trained on the bundled digits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import StageError
from torchslim.examples import digits
from torchslim.plugins.distill import DistillStage
from torchslim.plugins.prune import MagnitudePrune
from torchslim.plugins.quantize import DynamicQuantize

from .conftest import linear_weights, make_ctx


@pytest.mark.parametrize("scope", ["global", "layer"], ids=["global", "layer"])
def test_prune_zeroes_amount_and_leaves_no_masks(trained_mlp: nn.Module, flat: dict, scope: str) -> None:
    model = copy.deepcopy(trained_mlp)
    ctx = make_ctx(model, flat)
    out = MagnitudePrune(amount=0.6, scope=scope).apply(model, ctx)
    total = sum(w.numel() for w in linear_weights(out))
    zeros = sum(int((w == 0).sum()) for w in linear_weights(out))
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    assert ctx.metrics["pruned_sparsity"] == pytest.approx(zeros / total)
    names = [n for n, _ in out.named_parameters()] + [n for n, _ in out.named_buffers()]
    assert not any("weight_orig" in n or "weight_mask" in n for n in names)
    if scope == "layer":
        for w in linear_weights(out):
            assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=0.01)


def test_prune_exclude_keeps_named_layer(trained_mlp: nn.Module, flat: dict) -> None:
    model = copy.deepcopy(trained_mlp)
    last = copy.deepcopy(model[4].weight)
    MagnitudePrune(amount=0.5, exclude=["4"]).apply(model, make_ctx(model, flat))
    assert torch.equal(model[4].weight, last)
    assert float((model[0].weight == 0).float().mean()) > 0.3


def test_prune_matching_nothing_is_an_error(trained_mlp: nn.Module, flat: dict) -> None:
    model = copy.deepcopy(trained_mlp)
    with pytest.raises(StageError, match=r"matched no layer.*Linear x3"):
        MagnitudePrune(amount=0.5, modules=["Conv2d"]).apply(model, make_ctx(model, flat))


@pytest.mark.parametrize("dtype", ["qint8", "float16"], ids=["qint8", "float16"])
def test_quantize_dynamic_swaps_every_linear(trained_mlp: nn.Module, flat: dict, dtype: str) -> None:
    model = copy.deepcopy(trained_mlp)
    ctx = make_ctx(model, flat)
    out = DynamicQuantize(dtype=dtype).apply(model, ctx)
    # torch's dynamic Linear, or torchslim's 8-bit-activation subclass of it (qint8 on a VNNI CPU).
    linears = [m for m in out.modules() if "Linear" in type(m).__name__ and not type(m).__name__.endswith("Params")]
    assert len(linears) == 3 and all(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in linears)
    assert ctx.metrics["quantized_layers"] == 3
    x = ctx.example_inputs
    agreement = float((out(x).argmax(1) == trained_mlp(x).argmax(1)).float().mean())
    assert agreement > 0.95


def test_quantize_restore_rebuilds_the_same_structure(trained_mlp: nn.Module, flat: dict) -> None:
    stage = DynamicQuantize()
    ctx = make_ctx(trained_mlp, flat)
    out = stage.apply(copy.deepcopy(trained_mlp), ctx)
    fresh = stage.restore(digits.mlp(hidden=32), ctx.restore_record)
    fresh.load_state_dict(out.state_dict())
    x = next(iter(flat["eval"]))[0]
    assert torch.equal(fresh(x), out(x))


def test_quantize_model_without_linear_is_an_error(flat: dict) -> None:
    model = digits.cnn(channels=4)
    model[7] = nn.Identity()  # drop the classifier: no Linear remains
    with pytest.raises(StageError, match=r"matched no layer; the model has: Conv2d x2"):
        DynamicQuantize().apply(model, make_ctx(model, flat))


def test_distill_loss_uses_true_labels() -> None:
    stage = DistillStage(alpha=0.0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.tensor([1, 2, 3, 4])
    # With alpha 0 only the hard-label term remains: it must be CE against the labels,
    # not against the teacher's argmax (the common mistake FIELD.md describes).
    assert torch.allclose(stage.loss(student, teacher, labels), F.cross_entropy(student, labels))
    assert not torch.allclose(stage.loss(student, teacher, labels), F.cross_entropy(student, teacher.argmax(1)))
    soft_only = DistillStage(alpha=1.0, temperature=2.0).loss(student, teacher, labels)
    expected = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean") * 4
    assert torch.allclose(soft_only, expected)


def test_distill_recovers_pruned_model_and_keeps_zeros(trained_mlp: nn.Module, flat: dict) -> None:
    model = copy.deepcopy(trained_mlp)
    ctx = make_ctx(trained_mlp, flat)
    torch.manual_seed(0)
    MagnitudePrune(amount=0.8, scope="layer").apply(model, ctx)
    zeros = [(w == 0) for w in linear_weights(model)]
    pruned_score = ctx.evaluate(model)
    out = DistillStage(epochs=3, lr=3e-3).apply(model, ctx)
    assert ctx.evaluate(out) > pruned_score
    for mask, w in zip(zeros, linear_weights(out), strict=True):
        assert bool((w[mask] == 0).all())
    assert ctx.metrics["train_loss"] > 0


def test_distill_from_teacher_spec(trained_mlp: nn.Module, flat: dict) -> None:
    student = digits.mlp(hidden=16)
    ctx = make_ctx(trained_mlp, flat)
    before = ctx.evaluate(student)
    teacher = {"target": "torchslim.examples.digits:mlp", "kwargs": {"hidden": 32, "train_epochs": 5}}
    out = DistillStage(teacher=teacher, epochs=2, lr=3e-3, schedule="constant").apply(student, ctx)
    assert ctx.evaluate(out) > before + 20


def test_distill_refuses_quantized_model(trained_mlp: nn.Module, flat: dict) -> None:
    ctx = make_ctx(trained_mlp, flat)
    quantized = DynamicQuantize().apply(copy.deepcopy(trained_mlp), ctx)
    with pytest.raises(StageError, match="no trainable float parameters"):
        DistillStage().apply(quantized, ctx)
