"""The prune stage's methods (structured, N:M, gradual, capped magnitude) and the packed sparse encoding,
on tiny real models trained on the bundled digits."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import torchslim
from torchslim import RecipeError, Registry, StageError, load_recipe
from torchslim.engine.metrics import accuracy, count_macs
from torchslim.engine.packed import pack_state_dict, packed_size_bytes, saved_bytes, smallest_state, unpack_state_dict
from torchslim.examples import digits, mobile
from torchslim.plugins._masks import ZeroMasks
from torchslim.plugins._train import finetune
from torchslim.plugins.prune import MagnitudePrune, NMPrune, PruneStage, StructuredPrune, WandaPrune

from .conftest import FAST_METRICS, digits_recipe, make_ctx

ROOT = Path(__file__).resolve().parent.parent


class Branches(nn.Module):
    """Two conv branches joined by a concatenation: their channels map into the next conv's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.mix(torch.cat([self.a(x), self.b(x)], dim=1)))


@pytest.fixture(scope="module")
def trained_resnet() -> nn.Module:
    return digits.resnet(width=8, blocks=1, train_epochs=1)


@pytest.fixture(scope="module")
def trained_mobile() -> nn.Module:
    return mobile.mobilenet(width=8, train_epochs=1)


@pytest.fixture(scope="module")
def trained_branches(images: dict) -> nn.Module:
    torch.manual_seed(0)
    model = Branches()
    digits.fit(model, images["train"], 1)
    return model.eval()


def fresh(name: str) -> nn.Module:
    factories = {
        "resnet": lambda: digits.resnet(width=8, blocks=1),
        "mobile": lambda: mobile.mobilenet(width=8),
        "branches": Branches,
    }
    return factories[name]()


# --- validation -------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"amount": 0.5, "n": 2}, "stages[0].n (prune): 'n' does not apply to method magnitude; it is an option of method nm"),
    ({"method": "nm", "amount": 0.5}, "stages[0].amount (prune): 'amount' does not apply to method nm"),
    ({"method": "nm", "scope": "layer"}, "stages[0].scope (prune): 'scope' does not apply to method nm"),
    (
        {"method": "structured", "amount": 0.5, "modules": ["Linear"]},
        "stages[0].modules (prune): 'modules' does not apply to method structured",
    ),
    (
        {"amount": 0.5, "round_to": 8},
        "stages[0].round_to (prune): 'round_to' does not apply to method magnitude; it is an option of method structured",
    ),
    ({"amount": 0.5, "importance": "l2"}, "stages[0].importance (prune): 'importance' does not apply to method magnitude"),
    (
        {"method": "nm", "max_layer_amount": 0.5},
        "stages[0].max_layer_amount (prune): 'max_layer_amount' does not apply to method nm",
    ),
    ({"method": "structured"}, "stages[0].amount (prune): required field 'amount' is missing"),
    ({"method": "nm", "n": 4, "m": 4}, "stages[0].m (prune): n (4) must be smaller than m (4)"),
    ({"method": "nm", "steps": 3}, "stages[0].steps (prune): 2:4 pruning takes at most 2 steps"),
    (
        {"amount": 0.5, "finetune_epochs": 2},
        "stages[0].finetune_epochs (prune): fine-tuning runs between steps and needs steps >= 2",
    ),
    (
        {"amount": 0.5, "steps": 2, "finetune_lr": 0.01},
        "stages[0].finetune_lr (prune): 'finetune_lr' applies only with finetune_epochs",
    ),
    (
        {"method": "structured", "amount": 0.5, "max_layer_amount": 1.0},
        "stages[0].max_layer_amount (prune): Input should be less than 1",
    ),
    ({"method": "random", "amount": 0.5}, "stages[0].method (prune): Input should be 'magnitude', 'wanda', 'structured' or 'nm'"),
    ({"method": "wanda", "amount": 0.5, "scope": "global"}, "stages[0].scope (prune): 'scope' does not apply to method wanda"),
    (
        {"method": "wanda", "amount": 0.5, "modules": ["Conv2d"]},
        "stages[0].modules (prune): method wanda prunes Linear layers only, not Conv2d",
    ),
    (
        {"amount": 0.5, "calibration_batches": 2},
        "stages[0].calibration_batches (prune): 'calibration_batches' does not apply to method magnitude",
    ),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[m.split(": ", 1)[1][:40] for _, m in BAD_OPTIONS])
def test_options_of_another_method_are_refused(registry: Registry, options: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(digits_recipe([{"type": "prune", **options}]), registry)
    assert message in str(info.value)


COMMON = {
    "type": "prune",
    "name": None,
    "exclude": [],
    "steps": 1,
    "finetune_epochs": None,
    "finetune_lr": None,
    "recalibrate_bn": True,
}
RESOLVED = [
    (
        {"amount": 0.5},
        {
            **COMMON,
            "method": "magnitude",
            "amount": 0.5,
            "scope": "global",
            "modules": ["Linear", "Conv2d"],
            "max_layer_amount": None,
        },
    ),
    (
        {"method": "structured", "amount": 0.5},
        {
            **COMMON,
            "method": "structured",
            "amount": 0.5,
            "scope": "global",
            "importance": "l1",
            "round_to": 1,
            "max_layer_amount": 0.9,
            "time_limit": None,
            "time_limit_clock": "wall",
            "head_amount": None,
            "refit": False,
            "calibration_batches": 16,
            "layer_pruners": {},
            "group_amounts": {},
        },
    ),
    ({"method": "nm"}, {**COMMON, "method": "nm", "modules": ["Linear", "Conv2d"], "n": 2, "m": 4}),
    (
        {"method": "wanda", "amount": 0.5},
        {**COMMON, "method": "wanda", "amount": 0.5, "modules": ["Linear"], "calibration_batches": 8},
    ),
    (
        {"amount": 0.5, "steps": 2, "finetune_epochs": 1},
        {
            **COMMON,
            "method": "magnitude",
            "amount": 0.5,
            "scope": "global",
            "modules": ["Linear", "Conv2d"],
            "max_layer_amount": None,
            "steps": 2,
            "finetune_epochs": 1,
            "finetune_lr": 0.001,
        },
    ),
]


@pytest.mark.parametrize(("options", "expected"), RESOLVED, ids=["magnitude", "structured", "nm", "wanda", "finetune"])
def test_resolved_defaults_depend_on_method_and_validate_again(registry: Registry, options: dict, expected: dict) -> None:
    recipe = load_recipe(digits_recipe([{"type": "prune", **options}]), registry)
    stage = recipe.resolved()["stages"][0]
    assert stage == expected  # each method shows its own options, defaults filled in
    # A saved model's recipe.yaml holds the resolved form: it must load again unchanged.
    again = load_recipe({**recipe.resolved()}, registry)
    assert again.resolved()["stages"][0] == stage


METHOD_CLASSES = [
    ({"amount": 0.5}, MagnitudePrune),
    ({"method": "wanda", "amount": 0.5}, WandaPrune),
    ({"method": "structured", "amount": 0.5}, StructuredPrune),
    ({"method": "nm"}, NMPrune),
]


@pytest.mark.parametrize(("options", "cls"), METHOD_CLASSES, ids=["magnitude", "wanda", "structured", "nm"])
def test_each_method_is_its_own_class(registry: Registry, options: dict, cls: type[PruneStage]) -> None:
    recipe = load_recipe(digits_recipe([{"type": "prune", **options}]), registry)
    assert type(recipe.stage_list[0]) is cls
    assert type(PruneStage.from_options(**options)) is cls
    assert cls.methods == ()  # a method class is no family of its own


@pytest.mark.parametrize(
    ("cls", "options", "loc"),
    [
        (NMPrune, {"n": 4, "m": 4}, ("m",)),
        (NMPrune, {"steps": 3}, ("steps",)),
        (MagnitudePrune, {"amount": 0.5, "finetune_epochs": 1}, ("finetune_epochs",)),
        (StructuredPrune, {"amount": 0.5, "steps": 2, "finetune_lr": 0.01}, ("finetune_lr",)),
    ],
    ids=["n-not-below-m", "nm-steps", "finetune-one-step", "lr-without-finetune"],
)
def test_checks_across_options_name_the_option(cls: type[PruneStage], options: dict, loc: tuple) -> None:
    with pytest.raises(ValidationError) as info:
        cls(**options)
    assert [error["loc"] for error in info.value.errors()] == [loc]


def test_every_check_across_options_is_reported() -> None:
    with pytest.raises(ValidationError) as info:
        NMPrune(n=4, m=4, finetune_lr=0.01)
    assert [error["loc"] for error in info.value.errors()] == [("m",), ("finetune_lr",)]


def test_finetune_lr_defaults_only_with_finetuning() -> None:
    assert MagnitudePrune(amount=0.5, steps=2, finetune_epochs=1).finetune_lr == 0.001
    assert MagnitudePrune(amount=0.5, steps=2, finetune_epochs=1, finetune_lr=0.01).finetune_lr == 0.01
    assert MagnitudePrune(amount=0.5).finetune_lr is None


def test_example_recipe_validates(registry: Registry) -> None:
    recipe = load_recipe(ROOT / "recipes" / "prune-structured.yaml", registry)
    assert [s.type for s in recipe.stage_list] == ["prune", "distill"]
    assert recipe.resolved()["stages"][0]["method"] == "structured"


# --- structured -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "amount", "scope", "min_macs_ratio"),
    [
        ("resnet", 0.5, "global", 2.5),
        ("resnet", 0.5, "layer", 2.5),
        ("mobile", 0.4, "global", 1.8),
        ("branches", 0.5, "global", 2.5),
    ],
    ids=["resnet-global", "resnet-layer", "mobile-global", "concat-global"],
)
def test_structured_removes_channels_and_restores_exactly(
    request: pytest.FixtureRequest, images: dict, name: str, amount: float, scope: str, min_macs_ratio: float
) -> None:
    trained = request.getfixturevalue(f"trained_{name}")
    model, ctx = copy.deepcopy(trained), make_ctx(trained, images)
    stage = StructuredPrune(amount=amount, scope=scope)
    out = stage.apply(model, ctx)
    x = ctx.example_inputs
    assert out(x).shape == (x.shape[0], 10)
    assert out.classifier.out_features == 10
    assert count_macs(trained, x[:1]) / count_macs(out, x[:1]) >= min_macs_ratio
    assert ctx.metrics["pruned_channels"] == pytest.approx(amount, abs=0.05)
    for conv in (m for m in out.modules() if isinstance(m, nn.Conv2d) and m.groups > 1):
        assert conv.groups == conv.in_channels == conv.out_channels  # depthwise stays depthwise
    json.dumps(ctx.restore_record)  # plain data, as saved with the model
    rebuilt = stage.restore(fresh(name).eval(), ctx.restore_record)
    rebuilt.load_state_dict(out.state_dict(), strict=True)
    assert torch.equal(rebuilt.eval()(x), out.eval()(x))


def test_structured_round_to_leaves_multiples(trained_resnet: nn.Module, images: dict) -> None:
    model, ctx = copy.deepcopy(trained_resnet), make_ctx(trained_resnet, images)
    out = StructuredPrune(amount=0.5, scope="layer", round_to=4).apply(model, ctx)
    widths = [m.out_channels for m in out.modules() if isinstance(m, nn.Conv2d)]
    assert widths and all(w % 4 == 0 for w in widths)
    assert max(widths) < 16


def test_structured_time_limit_says_how_far_it_got(trained_resnet: nn.Module, images: dict) -> None:
    model, ctx = copy.deepcopy(trained_resnet), make_ctx(trained_resnet, images)
    with pytest.raises(
        StageError,
        match=r"tracing the dependency graph took more than 70% of time_limit=1e-09 s "
        r"\(no group listed yet\); raise time_limit",
    ):
        StructuredPrune(amount=0.5, time_limit=1e-9).apply(model, ctx)


def test_structured_time_limit_outside_the_main_thread_is_kept_between_groups(
    trained_resnet: nn.Module, images: dict, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    model, ctx = copy.deepcopy(trained_resnet), make_ctx(trained_resnet, images)
    errors: list[BaseException] = []

    def prune() -> None:
        try:
            StructuredPrune(amount=0.5, time_limit=1e-9).apply(model, ctx)
        except StageError as exc:
            errors.append(exc)

    worker = threading.Thread(target=prune)
    with caplog.at_level("WARNING"):
        worker.start()
        worker.join()
    # no timer interrupts a thread: the trace finishes, and the limit stops the listing before its first group
    assert errors and "listing and scoring the groups took more than 70% of time_limit=1e-09 s" in str(errors[0])
    assert "time_limit=1e-09 s cannot interrupt Torch-Pruning here (not in the main thread)" in caplog.text
    assert model.stem[0].out_channels == trained_resnet.stem[0].out_channels


def test_structured_exclude_keeps_the_coupled_channels(trained_resnet: nn.Module, images: dict) -> None:
    model, ctx = copy.deepcopy(trained_resnet), make_ctx(trained_resnet, images)
    out = StructuredPrune(amount=0.5, exclude=["stage1.0.conv1"]).apply(model, ctx)
    assert out.stage1[0].conv1.out_channels == 8 and out.stage1[0].bn1.num_features == 8
    assert out.stage2[0].conv1.out_channels < 16


@pytest.mark.parametrize("tail", [[], [nn.LogSoftmax(dim=1)]], ids=["logits", "log-softmax-after"])
def test_structured_keeps_output_layer(trained_mlp: nn.Module, flat: dict, tail: list[nn.Module]) -> None:
    model = nn.Sequential(*copy.deepcopy(trained_mlp), *tail)
    ctx = make_ctx(model, flat)
    out = StructuredPrune(amount=0.5).apply(model, ctx)
    assert out[4].out_features == 10
    assert out[0].out_features + out[2].out_features == 32  # half of the 64 hidden neurons


def test_structured_ceiling_protects_a_weak_layer(trained_mlp: nn.Module, flat: dict) -> None:
    def weakened() -> nn.Module:
        model = copy.deepcopy(trained_mlp)
        with torch.no_grad():  # every neuron of the first hidden layer but one is nearly dead
            model[0].weight[1:] *= 1e-3
            model[2].weight[:, 1:] *= 1e-3
        return model

    capped = StructuredPrune(amount=0.5, max_layer_amount=0.5).apply(weakened(), make_ctx(trained_mlp, flat))
    uncapped = StructuredPrune(amount=0.5, max_layer_amount=0.99).apply(weakened(), make_ctx(trained_mlp, flat))
    assert capped[0].out_features == 16
    assert uncapped[0].out_features == 1


def test_structured_with_nothing_prunable_is_an_error(flat: dict) -> None:
    model = nn.Sequential(nn.Linear(64, 10))
    with pytest.raises(StageError, match=r"no channel could be removed.*left alone: 0"):
        StructuredPrune(amount=0.5).apply(model, make_ctx(model, flat))


def test_structured_gradual_with_finetune(trained_resnet: nn.Module, images: dict) -> None:
    model, ctx = copy.deepcopy(trained_resnet), make_ctx(trained_resnet, images)
    stage = StructuredPrune(amount=0.5, steps=2, finetune_epochs=1)
    out = stage.apply(model, ctx)
    assert ctx.metrics["pruned_channels"] == pytest.approx(0.5, abs=0.05)
    assert ctx.metrics["finetune_loss"] > 0
    rebuilt = stage.restore(fresh("resnet").eval(), ctx.restore_record)
    rebuilt.load_state_dict(out.state_dict(), strict=True)
    assert torch.equal(rebuilt.eval()(ctx.example_inputs), out(ctx.example_inputs))


def test_structured_saved_model_reloads_identically(tmp_path: Path, trained_resnet: nn.Module, images: dict) -> None:
    checkpoint = tmp_path / "resnet.pt"
    torch.save(trained_resnet.state_dict(), checkpoint)
    recipe = digits_recipe([{"type": "prune", "method": "structured", "amount": 0.5, "round_to": 2}])
    recipe["model"] = {
        "target": "torchslim.examples.digits:resnet",
        "kwargs": {"width": 8, "blocks": 1},
        "checkpoint": str(checkpoint),
    }
    recipe["data"]["kwargs"]["image"] = True
    recipe["metrics"] = dict(FAST_METRICS)
    registry = Registry.load(autoload=False)
    report = torchslim.run(recipe, tmp_path / "out", registry=registry)
    loaded = torchslim.load_model(tmp_path / "out", registry)
    model, ctx = copy.deepcopy(trained_resnet), make_ctx(trained_resnet, images)
    expected = StructuredPrune(amount=0.5, round_to=2).apply(model, ctx)
    x = ctx.example_inputs
    assert torch.equal(loaded(x), expected(x))
    assert report.final.metrics["macs"] < report.baseline.metrics["macs"] / 2.5


# --- N:M and magnitude ------------------------------------------------------------------------


def follows_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` weights along the input dimension (at each kernel position) has at most ``n`` non-zeros."""
    groups = (weight.detach().movedim(1, -1) != 0).reshape(-1, m)
    return bool((groups.sum(dim=1) <= n).all())


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8)], ids=["2:4", "1:4", "2:8"])
def test_nm_pattern_on_linear_layers(trained_mlp: nn.Module, flat: dict, n: int, m: int) -> None:
    model, ctx = copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat)
    out = NMPrune(n=n, m=m).apply(model, ctx)
    for layer in (out[0], out[2], out[4]):
        assert follows_pattern(layer.weight, n, m)
    assert ctx.metrics["pruned_sparsity"] == pytest.approx(1 - n / m)
    assert any("sparse tensor cores" in note for note in ctx.notes)


def test_nm_on_convs_skips_layers_that_cannot_follow(trained_resnet: nn.Module, images: dict) -> None:
    model, ctx = copy.deepcopy(trained_resnet), make_ctx(trained_resnet, images)
    out = NMPrune().apply(model, ctx)
    assert follows_pattern(out.stage1[0].conv1.weight, 2, 4)  # 8 input channels: groups of 4 along them
    assert follows_pattern(out.stage2[0].shortcut[0].weight, 2, 4)
    assert bool((out.stem[0].weight != 0).all())  # one input channel: left dense
    assert ctx.metrics["skipped_layers"] == 1


def test_nm_gradual_ends_on_the_pattern(trained_mlp: nn.Module, flat: dict) -> None:
    model, ctx = copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat)
    out = NMPrune(steps=2, finetune_epochs=1).apply(model, ctx)
    assert all(follows_pattern(layer.weight, 2, 4) for layer in (out[0], out[2], out[4]))
    assert ctx.metrics["pruned_sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("scope", ["global", "layer"], ids=["global", "layer"])
def test_magnitude_ceiling_caps_each_layer(trained_mlp: nn.Module, flat: dict, scope: str) -> None:
    model, ctx = copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat)
    out = MagnitudePrune(amount=0.8, scope=scope, max_layer_amount=0.5).apply(model, ctx)
    for layer in (out[0], out[2], out[4]):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_magnitude_gradual_reaches_amount(trained_mlp: nn.Module, flat: dict) -> None:
    model, ctx = copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat)
    MagnitudePrune(amount=0.6, steps=3, finetune_epochs=1).apply(model, ctx)
    assert ctx.metrics["pruned_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert any("unstructured pruning" in note for note in ctx.notes)


def test_wanda_keeps_small_weights_on_loud_inputs() -> None:
    """Input feature 0 is 100x louder than the others: wanda keeps its small weights, magnitude would not."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.abs_().add_(0.1)
        layer.weight[:, 0] = 0.05  # the smallest weights of every row
    inputs = torch.randn(64, 8)
    inputs[:, 0] *= 100
    model = nn.Sequential(layer)
    original = copy.deepcopy(model)
    loader = [(inputs[i : i + 16], torch.zeros(16)) for i in range(0, 64, 16)]
    ctx = make_ctx(original, {"calibration": loader, "eval": loader}, evaluate=lambda m: 0.0)
    WandaPrune(amount=0.5, calibration_batches=4).apply(model, ctx)
    weight = model[0].weight
    assert bool((weight[:, 0] != 0).all()), "the loud input's weights survive"
    assert [int((row == 0).sum()) for row in weight] == [4, 4, 4, 4], "half of every row"
    # Each row loses exactly its lowest |w| * ||x|| scores.
    score = original[0].weight.abs() * inputs.norm(dim=0)
    expected = score <= score.kthvalue(4, dim=1, keepdim=True).values
    assert torch.equal(weight == 0, expected)
    magnitude = copy.deepcopy(original)
    MagnitudePrune(amount=0.5, scope="layer").apply(magnitude, make_ctx(original, ctx.data, evaluate=lambda m: 0.0))
    assert bool((magnitude[0].weight[:, 0] == 0).all())


def test_wanda_on_the_digits_mlp_prunes_every_row_and_notes_the_cpu(trained_mlp: nn.Module, flat: dict) -> None:
    model, ctx = copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat)
    WandaPrune(amount=0.6, steps=2, calibration_batches=2).apply(model, ctx)
    for layer in (model[0], model[2], model[4]):
        per_row = (layer.weight == 0).sum(dim=1)
        assert bool((per_row == round(0.6 * layer.in_features)).all())
    assert ctx.metrics["pruned_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert ctx.evaluate(model) > 50  # still a classifier (10 classes: chance is 10%)
    assert any("unstructured pruning" in note for note in ctx.notes)


def test_wanda_saved_model_reloads_with_its_zeros_and_score(tmp_path: Path) -> None:
    recipe = digits_recipe([{"type": "prune", "method": "wanda", "amount": 0.5, "calibration_batches": 2}])
    recipe["metrics"] = dict(FAST_METRICS)
    registry = Registry.load(autoload=False)
    report = torchslim.run(recipe, tmp_path / "out", registry=registry)
    loaded = torchslim.load_model(tmp_path / "out", registry)
    for layer in (m for m in loaded.modules() if isinstance(m, nn.Linear)):
        assert bool(((layer.weight == 0).sum(dim=1) == round(0.5 * layer.in_features)).all())
    assert accuracy(loaded, digits.loaders()["eval"]) == report.final.metrics["accuracy"]


def test_wanda_without_calibration_data_is_an_error(trained_mlp: nn.Module, flat: dict) -> None:
    ctx = make_ctx(trained_mlp, {**flat, "calibration": []})
    with pytest.raises(StageError, match="method wanda: the calibration data yielded no batch"):
        WandaPrune(amount=0.5).apply(copy.deepcopy(trained_mlp), ctx)


def test_finetune_keeps_pruned_weights_zero(trained_mlp: nn.Module, flat: dict) -> None:
    model, ctx = copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat)
    MagnitudePrune(amount=0.7).apply(model, ctx)
    layers = (model[0], model[2], model[4])
    zeros = [layer.weight == 0 for layer in layers]
    before = [layer.weight.detach().clone() for layer in layers]
    finetune(model, flat["train"], 1, 1e-2, ZeroMasks.of(model))  # as between steps: every zero of the model kept
    for mask, layer, old in zip(zeros, layers, before, strict=True):
        assert bool((layer.weight[mask] == 0).all())
        assert not torch.equal(layer.weight, old)


# --- packed encoding --------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def sparse(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g)
    t = t * (torch.rand(shape, generator=g) >= sparsity)  # masking negatives gives -0.0, as pruning does
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97], ids=["dense", "half", "mostly-zero"])
def test_packed_round_trip_is_bit_identical(dtype: torch.dtype, sparsity: float) -> None:
    weight = sparse((97, 61), sparsity, dtype)
    weight.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    state = {
        "w": weight,
        "b": torch.randn(7).to(dtype),
        "count": torch.tensor(3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(-0.0),
    }
    buffer = io.BytesIO()
    torch.save(pack_state_dict(state), buffer)
    buffer.seek(0)
    back = unpack_state_dict(torch.load(buffer, weights_only=True))
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(bits(back[name]), bits(tensor)), name


def test_packed_size_tells_the_truth_about_sparsity() -> None:
    dense = {"w": torch.randn(256, 256)}
    half = {"w": sparse((256, 256), 0.5, torch.float32)}
    assert smallest_state(dense) is dense  # nothing to gain: saved as it is
    ratio = saved_bytes(pack_state_dict(half)) / saved_bytes(half)
    assert 0.5 < ratio < 0.58  # values (about half) + 1 bit per weight + 1 bit per zero (-0.0 signs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao's own deprecation notices
def test_packed_passes_quantized_state_through(trained_mlp: nn.Module, flat: dict) -> None:
    model = copy.deepcopy(trained_mlp)
    MagnitudePrune(amount=0.7).apply(model, make_ctx(model, flat))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    buffer = io.BytesIO()
    torch.save(pack_state_dict(quantized.state_dict()), buffer)
    buffer.seek(0)
    again = torch.ao.quantization.quantize_dynamic(copy.deepcopy(trained_mlp), {nn.Linear}, dtype=torch.qint8)
    again.load_state_dict(unpack_state_dict(torch.load(buffer, weights_only=True)))
    x = next(iter(flat["eval"]))[0]
    assert torch.equal(again(x), quantized(x))


def test_packed_bytes_of_a_pruned_model(trained_mlp: nn.Module, flat: dict) -> None:
    model = digits.mlp(hidden=128)
    dense_bytes = packed_size_bytes(model)
    MagnitudePrune(amount=0.7).apply(model, make_ctx(model, flat))
    assert packed_size_bytes(model) < 0.5 * dense_bytes
    assert unpack_state_dict(smallest_state(model.state_dict())).keys() == model.state_dict().keys()


class _HardCoded(nn.Module):
    """conv2's channel count is hard-coded in forward (a buffer of 16 gains): pruning it breaks the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)
        self.register_buffer("gain", torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(x))) * self.gain.view(1, 16, 1, 1)
        return self.head(torch.relu(self.conv3(x)).mean(dim=(2, 3)))


def test_structured_leaves_a_group_whose_cut_breaks_the_forward_whole_and_spends_its_share_elsewhere() -> None:
    from torchslim.plugins.prune._structured import ChannelOptions, ChannelState, prune_step, pruned_fraction

    torch.manual_seed(0)
    model, state = _HardCoded().eval(), ChannelState()
    prune_step(model, torch.randn(2, 3, 8, 8), 0.3, ChannelOptions("global", 1, 1, 0.9, []), state)
    assert model.conv2.out_channels == 16 and "forward failed" in state.skipped["conv2"]
    assert model.conv1.out_channels + model.conv3.out_channels <= 32 - 14  # conv2's share went to the others
    assert pruned_fraction(model, state) == pytest.approx(0.3, abs=0.03)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)
