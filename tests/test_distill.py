"""The distill stage on tiny real models: logit and feature KD, students from specs, masks, seeds, DDP."""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchslim
from torchslim import RecipeError, Registry, StageError
from torchslim.examples import digits
from torchslim.plugins._kd import hinton_loss, projection
from torchslim.plugins._shard import TrainBatches
from torchslim.plugins.distill import DistillStage
from torchslim.plugins.prune import MagnitudePrune

from .conftest import digits_recipe, linear_weights, make_ctx, write_recipe

#: Eval-set logits of every model the custom metric below scored, in order (the last is the final model).
SEEN: list[torch.Tensor] = []


def logits_accuracy(model: nn.Module, loader: Any) -> float:
    """Accuracy, keeping the logits: lets a test compare the run's final model with the loaded one."""
    with torch.inference_mode():
        batches = list(loader)
        logits = torch.cat([model(x) for x, _ in batches])
    SEEN.append(logits)
    labels = torch.cat([y for _, y in batches])
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


@pytest.fixture(scope="module")
def teacher(trained_mlp: nn.Module) -> nn.Module:
    """The teacher of these tests: the shared trained MLP."""
    return trained_mlp


def test_logit_kd_recovers_and_keeps_zeros_at_high_sparsity(teacher: nn.Module, flat: dict) -> None:
    model = copy.deepcopy(teacher)
    ctx = make_ctx(teacher, flat)
    torch.manual_seed(0)
    MagnitudePrune(amount=0.9, scope="layer").apply(model, ctx)
    zeros = [w == 0 for w in linear_weights(model)]
    pruned = ctx.evaluate(model)
    out = DistillStage(epochs=3, lr=3e-2).apply(model, ctx)
    for mask, w in zip(zeros, linear_weights(out), strict=True):
        assert bool((w[mask] == 0).all())
        assert float(mask.float().mean()) == pytest.approx(0.9, abs=0.01)
    assert ctx.evaluate(out) > pruned + 40
    metrics = ctx.metrics
    assert metrics["best_accuracy"] >= ctx.evaluate(out)
    assert metrics["epochs_run"] == 3 and metrics["train_loss"] > 0


@pytest.mark.parametrize("loss", ["mse", "cosine"], ids=["mse", "cosine"])
def test_feature_kd_trains_through_a_projection(teacher: nn.Module, flat: dict, loss: str) -> None:
    pair = {"student": "1", "teacher": "1", "loss": loss}  # ReLU outputs: 16 wide vs 32 wide
    feature_loss = {}
    for steps in (1, 60):
        torch.manual_seed(0)
        student = digits.mlp(hidden=16)
        keys = set(student.state_dict())
        ctx = make_ctx(teacher, flat)
        stage = DistillStage(alpha=0.0, features=[pair], epochs=3, max_steps=steps, lr=1e-2, schedule="constant")
        out = stage.apply(student, ctx)
        assert set(out.state_dict()) == keys  # the projection is not part of the returned model
        assert not any(m._forward_hooks for m in out.modules())  # nor are the hooks
        feature_loss[steps] = ctx.metrics["feature_loss"]
    assert feature_loss[60] < feature_loss[1] / 3, feature_loss


def test_feature_kd_pulls_same_width_features_to_the_teacher(teacher: nn.Module, flat: dict) -> None:
    inputs = torch.cat([x for x, _ in flat["eval"]])
    distance = {}
    for name, features in (("labels", []), ("features", [{"student": "1", "teacher": "1"}])):
        torch.manual_seed(0)
        stage = DistillStage(alpha=0.0, features=features, epochs=2, lr=1e-2, schedule="constant")
        out = stage.apply(digits.mlp(hidden=32), make_ctx(teacher, flat))
        with torch.no_grad():
            distance[name] = float(((out[:2](inputs) - teacher[:2](inputs)) ** 2).mean())
    assert distance["features"] < distance["labels"] / 3, distance


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [
        ((16,), (32,), nn.Linear),
        ((8, 16), (8, 32), nn.Linear),
        ((4, 10), (8, 10), nn.Conv1d),
        ((4, 8, 8), (8, 8, 8), nn.Conv2d),
        ((8, 8, 8), (8, 8, 8), nn.Identity),
    ],
    ids=["vector", "tokens", "sequence", "image", "same"],
)
def test_projection_maps_widths(student: tuple[int, ...], teacher: tuple[int, ...], expected: type) -> None:
    s, t = torch.randn(2, *student), torch.randn(2, *teacher)
    proj = projection(s, t)
    assert type(proj) is expected
    assert proj(s).shape == t.shape


def test_projection_refuses_other_spatial_size() -> None:
    with pytest.raises(ValueError, match=r"N x 4 x 8 x 8 cannot be projected onto teacher output N x 8 x 4 x 4"):
        projection(torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ([{"student": "fc", "teacher": "1"}], r"features\[0\].student: no layer 'fc' in the student"),
        ([{"student": "1", "teacher": "44"}], r"features\[0\].teacher: no layer '44' in the teacher; did you mean '4'"),
    ],
    ids=["student-layer", "teacher-layer"],
)
def test_feature_layer_errors_name_the_option(teacher: nn.Module, flat: dict, features: list, message: str) -> None:
    student = digits.mlp(hidden=16)
    with pytest.raises(StageError, match=message):
        DistillStage(features=features).apply(student, make_ctx(teacher, flat))
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_feature_shapes_that_cannot_be_projected_are_a_stage_error() -> None:
    images = digits.loaders(image=True)
    teacher = digits.cnn(channels=8)  # layer 5 pools to N x 16 x 1 x 1
    with pytest.raises(
        StageError, match=r"features\[0\]: student output N x 4 x 8 x 8 cannot be projected onto teacher output N x 16 x 1 x 1"
    ):
        DistillStage(features=[{"student": "0", "teacher": "5"}]).apply(digits.cnn(channels=4), make_ctx(teacher, images))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"optimizer": "rmsprop"}, "stages[0].optimizer (distill): Input should be 'adam', 'adamw' or 'sgd'"),
        ({"features": [{"student": "1"}]}, "stages[0].features[0].teacher (distill): required field 'teacher' is missing"),
        ({"keep": "first"}, "stages[0].keep (distill): Input should be 'last' or 'best'"),
    ],
    ids=["optimizer", "feature-pair", "keep"],
)
def test_bad_options_fail_validation(registry: Registry, option: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        torchslim.load_recipe(digits_recipe([{"type": "distill", **option}]), registry)
    assert message in str(info.value)


@pytest.mark.slow
def test_student_from_spec_is_saved_and_loaded(registry: Registry, tmp_path: Path) -> None:
    student = {"target": "torchslim.examples.digits:mlp", "kwargs": {"hidden": 12}}
    recipe = digits_recipe([{"type": "distill", "student": student, "epochs": 2, "lr": 3e-2}], train_epochs=2)
    recipe["evaluate"] = {"metric": f"{__name__}:logits_accuracy", "name": "accuracy"}
    recipe["metrics"]["latency"] = False
    SEEN.clear()
    report = torchslim.run(recipe, tmp_path / "out", registry=registry)
    final = SEEN[-1]
    assert report.final.metrics["params"] == 64 * 12 + 12 + 12 * 12 + 12 + 12 * 10 + 10
    assert report.final.metrics["accuracy"] > 60
    loaded = torchslim.load_model(tmp_path / "out", registry)
    assert loaded[0].out_features == 12
    logits_accuracy(loaded, digits.loaders()["eval"])
    assert torch.equal(SEEN[-1], final)


def test_same_seed_same_weights_other_seed_other_order(teacher: nn.Module, flat: dict) -> None:
    def train(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        stage = DistillStage(epochs=1, max_steps=8, teacher="previous", alpha=0.7)
        out = stage.apply(copy.deepcopy(teacher), make_ctx(teacher, flat))
        return out.state_dict()

    first, again, other = train(3), train(3), train(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(("keep", "kept"), [("best", 2), ("last", 4)], ids=["best", "last"])
def test_keep_and_patience(teacher: nn.Module, flat: dict, keep: str, kept: int) -> None:
    scores = iter([40.0, 50.0, 70.0, 60.0, 65.0, 99.0])  # the first: the model as the stage received it
    snapshots: list[dict[str, torch.Tensor]] = []

    def scripted(model: nn.Module) -> float:
        snapshots.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    few = {**flat, "train": list(itertools.islice(flat["train"], 3))}  # the scores are scripted: 3 steps an epoch do
    ctx = make_ctx(teacher, few, evaluate=scripted)
    stage = DistillStage(epochs=5, patience=2, keep=keep, lr=1e-2, teacher="previous")
    state = stage.apply(copy.deepcopy(teacher), ctx).state_dict()
    assert ctx.metrics["epochs_run"] == 4  # epochs 3 and 4 did not beat epoch 2
    assert ctx.metrics["best_epoch"] == 2 and ctx.metrics["best_accuracy"] == 70.0
    for epoch, snapshot in enumerate(snapshots):
        assert all(torch.equal(state[k], snapshot[k]) for k in state) == (epoch == kept)


def test_hinton_loss_is_the_papers_soft_term_scaled_by_t_squared_plus_the_labels() -> None:
    # Issue 23 asked whether the KD loss was why distillation lost to labels: it is the paper's.
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), 3 * torch.randn(8, 10), torch.randint(10, (8,))
    t, alpha = 20.0, 0.9
    p_t, log_p_s = torch.softmax(teacher / t, 1), torch.log_softmax(student / t, 1)
    soft = (p_t * (p_t.log() - log_p_s)).sum(1).mean()  # KL(teacher || student), summed over classes
    hard = torch.nn.functional.cross_entropy(student, labels)
    expected = alpha * t * t * soft + (1 - alpha) * hard
    assert torch.allclose(hinton_loss(student, teacher, labels, t, alpha), expected)
    assert hinton_loss(teacher, teacher, labels, t, 1.0).abs() < 1e-4  # float rounding times T^2 = 400
    # At a high T the soft term's gradient is logit matching: (s - t) / classes per sample, centred.
    s = student.clone().requires_grad_()
    hinton_loss(s, teacher, labels, 100.0, 1.0).backward()
    centred = (student - student.mean(1, keepdim=True)) - (teacher - teacher.mean(1, keepdim=True))
    matching = centred / 10 / len(student)
    assert float((s.grad - matching).norm() / matching.norm()) < 0.05


def test_the_teacher_runs_in_eval_mode_while_the_student_trains(flat: dict) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    modes: list[bool] = []
    ctx = make_ctx(teacher, {**flat, "train": list(itertools.islice(flat["train"], 3))})
    ctx.original[2].register_forward_hook(lambda module, _i, _o: modes.append(module.training))
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    DistillStage(epochs=1, alpha=0.9, temperature=20.0).apply(student, ctx)
    assert len(modes) == 3 and not any(modes)  # dropout off: the soft targets are the teacher's own


@pytest.mark.parametrize(("width", "lr"), [(32, 1e-2), (1000, 3e-4)], ids=["small", "million"])
def test_the_default_lr_follows_the_students_size(flat: dict, width: int, lr: float) -> None:
    # Issue 23: 0.01 (chosen on small models) wrecked a pretrained 9.2M-parameter CRNN and MiniLM.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    ctx = make_ctx(model, flat)
    DistillStage(epochs=1, max_steps=2).apply(model, ctx)
    assert ctx.metrics["lr"] == lr
    assert DistillStage(epochs=1, max_steps=2, lr=0.05).apply(model, ctx) is model and ctx.metrics["lr"] == 0.05


@pytest.mark.parametrize("keep", ["best", "last"], ids=["best", "last"])
def test_a_stage_that_makes_its_input_worse_says_so_and_keep_best_returns_the_input(
    teacher: nn.Module, flat: dict, keep: str
) -> None:
    # Issue 23: a pretrained CRNN went from 40% to 0% at lr 0.01 and the stage kept the last epoch, silently.
    ctx = make_ctx(teacher, flat)
    received = ctx.evaluate(teacher)
    out = DistillStage(epochs=2, lr=1.0, keep=keep).apply(copy.deepcopy(teacher), ctx)  # an lr that wrecks it
    after = ctx.evaluate(out)
    same = all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), teacher.state_dict().values(), strict=True))
    if keep == "best":
        assert same and after == received and ctx.metrics["best_epoch"] == 0
        assert any("kept the model it received (keep: best)" in note and f"{received:.2f}" in note for note in ctx.notes)
    else:
        assert not same and after < received - 20
        assert any(f"worse than the {received:.2f} of the model it received" in note for note in ctx.notes)


def test_a_stage_that_improves_its_input_says_nothing_about_it(teacher: nn.Module, flat: dict) -> None:
    model = copy.deepcopy(teacher)
    MagnitudePrune(amount=0.8, scope="layer").apply(model, make_ctx(teacher, flat))
    ctx = make_ctx(teacher, flat)
    DistillStage(epochs=2, lr=1e-2, keep="best").apply(model, ctx)
    assert ctx.metrics["best_epoch"] > 0 and not any("model it received" in note for note in ctx.notes)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"], ids=["adam", "adamw", "sgd"])
def test_max_steps_and_optimizers(teacher: nn.Module, flat: dict, optimizer: str) -> None:
    model = copy.deepcopy(teacher)
    ctx = make_ctx(teacher, flat)
    DistillStage(optimizer=optimizer, epochs=4, max_steps=5, grad_clip=1.0, keep="last", lr=1e-2).apply(model, ctx)
    assert ctx.metrics["epochs_run"] == 1
    assert not all(torch.equal(a, b) for a, b in zip(linear_weights(model), linear_weights(teacher), strict=True))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log"])
def test_progress_line_on_terminal_log_lines_otherwise(
    teacher: nn.Module, flat: dict, terminal: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stream = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    caplog.set_level(logging.INFO, logger="test")
    few = {**flat, "train": list(itertools.islice(flat["train"], 4))}
    DistillStage(epochs=2, teacher="previous").apply(copy.deepcopy(teacher), make_ctx(teacher, few))
    epoch_lines = [r.getMessage() for r in caplog.records if "epoch 2/2" in r.getMessage()]
    if terminal:
        assert not epoch_lines
        assert "\rdistill: epoch 2/2 loss " in stream.getvalue() and "accuracy" in stream.getvalue()
        assert stream.getvalue().endswith("\n")
    else:
        assert stream.getvalue() == ""
        assert len(epoch_lines) == 1 and "accuracy" in epoch_lines[0]


def test_shards_cover_the_data_once_with_the_global_batch() -> None:
    dataset = TensorDataset(torch.arange(100).float(), torch.arange(100))
    loader = DataLoader(dataset, batch_size=10, shuffle=True)
    shards = [TrainBatches(loader, seed=7, world=2, rank=r) for r in (0, 1)]
    seen = [torch.cat([y for _, y in shard]) for shard in shards]
    assert [len(s) for s in seen] == [50, 50] and shards[0].length() == 10
    assert sorted(torch.cat(seen).tolist()) == list(range(100))
    one = [torch.cat([y for _, y in TrainBatches(loader, seed=7)]) for _ in range(2)]
    assert torch.equal(one[0], one[1])  # the order depends on the seed, not on the loader's generator


def test_generic_iterables_are_strided_evenly() -> None:
    batches = [(torch.zeros(2), torch.full((2,), i)) for i in range(5)]
    taken = [[int(y[0]) for _, y in TrainBatches(batches, seed=0, world=2, rank=r)] for r in (0, 1)]
    assert taken == [[0, 2], [1, 3]]  # the fifth batch has no partner: dropped, or DDP would wait forever


def test_two_gloo_processes_end_with_the_same_weights(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    import torch.multiprocessing as mp

    from .ddp_worker import run_rank

    options = {"epochs": 2, "lr": 1e-2}
    mp.spawn(run_rank, args=(2, str(tmp_path), options), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    states = [r["state"] for r in ranks]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert ranks[0]["after"] > ranks[0]["before"] + 10
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    weights = [v for k, v in states[0].items() if k.endswith("weight")]
    assert all(float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.01) for w in weights)


@pytest.mark.slow
def test_torchrun_two_processes_run_a_recipe(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    stages = [{"type": "prune", "amount": 0.8, "scope": "layer"}, {"type": "distill", "epochs": 2, "lr": 1e-2}]
    recipe = digits_recipe(stages, train_epochs=3)
    recipe["metrics"]["latency"] = False
    path = write_recipe(tmp_path, recipe)
    # --standalone picks a free port: other test runs on the machine may hold torchrun's default one.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "torchslim",
        "run",
        str(path),
        "--out",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("distill epoch 2/2") == 1  # only rank 0 reports progress
    headers = [line for line in result.stdout.splitlines() if line.startswith("stage ")]
    assert len(headers) == 1  # one table: rank 0 alone prints and writes
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["environment"]["processes"] == 2
    assert [row["stage"] for row in report["rows"]] == ["baseline", "prune", "distill"]
    # The accuracy cell is the one with a signed change: "63.06 (+15.28)".
    scores = {
        line.split()[0]: float(re.findall(r"([\d.]+) \([+-][\d.]+\)", line)[0])
        for line in result.stdout.splitlines()
        if line.startswith(("prune ", "distill "))
    }
    assert scores["distill"] > scores["prune"] + 10


def _output_targets(model: nn.Module, data: dict) -> dict:
    """The digits with the model's own outputs as labels (a regression / embedding task)."""
    out = {}
    for split in ("train", "calibration", "eval"):
        x = torch.cat([batch[0] for batch in data[split]])
        with torch.no_grad():
            out[split] = DataLoader(TensorDataset(x, model(x)), batch_size=64)
    return out


def _output_error(model: nn.Module, loader: Any, kind: str = "mse") -> float:
    """Mean squared error, or mean 1 - cosine similarity, of the model's outputs to the labels."""
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in loader]
    if kind == "cosine":
        return float(torch.cat([1 - torch.cosine_similarity(a, b, dim=1) for a, b in pairs]).mean())
    return float(sum(((a - b) ** 2).sum() for a, b in pairs) / sum(b.numel() for _, b in pairs))


@pytest.mark.parametrize(("kind", "alpha"), [("mse", 1.0), ("cosine", 1.0), ("mse", 0.5)])
def test_output_loss_for_outputs_that_are_not_logits(teacher: nn.Module, flat: dict, kind: str, alpha: float) -> None:
    data = _output_targets(teacher, flat)
    ctx = make_ctx(teacher, data, evaluate=lambda m: -_output_error(m, data["eval"]))
    model = copy.deepcopy(teacher)
    MagnitudePrune(amount=0.8, scope="layer").apply(model, ctx)
    before = _output_error(model, data["eval"], kind)
    out = DistillStage(epochs=3, lr=3e-3, output_loss=kind, alpha=alpha).apply(model, ctx)
    assert _output_error(out, data["eval"], kind) < 0.5 * before


def test_output_loss_with_class_labels_says_what_to_change(teacher: nn.Module, flat: dict) -> None:
    ctx = make_ctx(teacher, flat)
    with pytest.raises(StageError, match=r"labels' shape \(64,\) is not the outputs' \(64, 10\): set alpha: 1"):
        DistillStage(epochs=1, output_loss="mse", alpha=0.5).apply(copy.deepcopy(teacher), ctx)
