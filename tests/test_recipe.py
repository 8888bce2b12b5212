"""Recipe validation: good recipes load, bad ones fail with file, line, column, field and expectation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from torchslim import RecipeError, Registry, load_recipe
from torchslim.engine.recipe import format_path, recipe_model

from .conftest import digits_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_recipe_validates(registry: Registry) -> None:
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", registry)
    assert [s.type for s in recipe.stage_list] == ["prune", "distill", "quantize"]
    assert recipe.base_dir == (ROOT / "recipes").resolve()


def test_defaults_are_filled_in_resolved_recipe(registry: Registry) -> None:
    recipe = load_recipe(digits_recipe([{"type": "prune", "amount": 0.5}]), registry)
    stage = recipe.resolved()["stages"][0]
    assert stage == {
        "type": "prune",
        "name": None,
        "method": "magnitude",
        "amount": 0.5,
        "scope": "global",
        "modules": ["Linear", "Conv2d"],
        "exclude": [],
        "max_layer_amount": None,
        "steps": 1,
        "finetune_epochs": None,
        "finetune_lr": None,
        "recalibrate_bn": True,
    }
    assert recipe.resolved()["metrics"]["threads"] == 2


BAD_STAGES = [
    # (stage, expected message, text on the line the error points at)
    ({"type": "prune", "amount": 1.5}, "stages[0].amount (prune): Input should be less than 1", "amount: 1.5"),
    ({"type": "prune", "amount": 0.5, "scope": "row"}, "stages[0].scope (prune): Input should be 'global' or 'layer'", "row"),
    ({"type": "quantize", "dtype": "int4"}, "stages[0].dtype (quantize): Input should be 'qint8' or 'float16'", "int4"),
    (
        {"type": "quantize", "modules": ["Conv2d"]},
        "stages[0].modules (quantize): dynamic quantization cannot quantize Conv2d",
        "Conv2d",
    ),
    ({"type": "prune", "amount": 0.5, "modules": ["Lienar"]}, "'Lienar' is not a layer type of torch.nn", "Lienar"),
    (
        {"type": "sparsegpt"},
        "stages[0].type (sparsegpt): unknown stage type 'sparsegpt'; known types: deploy, distill, prune, quantize",
        "sparsegpt",
    ),
    (
        {"type": "prnue", "amount": 0.5},
        "stages[0].type (prnue): unknown stage type 'prnue' (did you mean 'prune'?); known types:",
        "prnue",
    ),
    (
        {"type": "prune", "amount": 70},
        "stages[0].amount (prune): Input should be less than 1 (a fraction of 1, not a percentage: 0.7?)",
        "amount: 70",
    ),
    ({"amount": 0.5}, "stages[0]: missing 'type'; known types: deploy, distill, prune, quantize", "- amount"),
    (
        {"type": "prune", "amount": 0.5, "amout": 1},
        "stages[0].amout (prune): unknown field 'amout'; did you mean 'amount'? prune accepts: type, name",
        "amout",
    ),
    ({"type": "prune"}, "stages[0].amount (prune): required field 'amount' is missing", "- type: prune"),
    ({"type": "distill", "alpha": 2}, "stages[0].alpha (distill): Input should be less than or equal to 1", "alpha: 2"),
    (
        {"type": "distill", "teacher": "parent"},
        "stages[0].teacher (distill): Input should be 'original' or 'previous'; or Input should be a valid dictionary",
        "parent",
    ),
]


@pytest.mark.parametrize(("stage", "message", "token"), BAD_STAGES, ids=[m.split(":")[0] for _, m, _ in BAD_STAGES])
def test_bad_stage_names_file_line_field(tmp_path: Path, registry: Registry, stage: dict, message: str, token: str) -> None:
    path = write_recipe(tmp_path, digits_recipe([stage]))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry)
    text = str(info.value)
    assert message in text
    match = re.match(rf"{re.escape(str(path))}:(\d+):(\d+): ", text)
    assert match, text
    line = path.read_text().splitlines()[int(match[1]) - 1]
    assert token in line, f"{text} points at {line!r}"


def test_every_problem_is_reported_once(tmp_path: Path, registry: Registry) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 2}, {"type": "quantize", "dtype": "x"}])
    recipe["extra"] = 1
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, recipe), registry)
    assert len(info.value.problems) == 3
    assert any("extra: unknown field 'extra'" in p for p in info.value.problems)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"kwargs": {}}}, "model.target: required field 'target' is missing"),
        ({"model": {"target": "no-colon"}}, "model.target: expected 'module:callable', e.g. mynet:build, found 'no-colon'"),
        ({"stages": []}, "stages: List should have at least 1 item"),
        ({"seed": "zero"}, "seed: Input should be a valid integer"),
        ({"metrics": {"runs": 0}}, "metrics.runs: Input should be greater than or equal to 1"),
        (
            {"evaluate": {"metric": "f1"}},
            "evaluate.metric: expected 'accuracy' or a 'module:callable' taking (model, loader), e.g. mymetrics:f1, found 'f1'",
        ),
    ],
    ids=["missing-target", "bad-target", "no-stages", "bad-seed", "zero-runs", "bad-metric"],
)
def test_bad_top_level(tmp_path: Path, registry: Registry, change: dict, message: str) -> None:
    recipe = {**digits_recipe([{"type": "prune", "amount": 0.5}]), **change}
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write_recipe(tmp_path, recipe), registry)


def test_not_a_mapping(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match=r"list.yaml:1:1: expected a mapping of recipe fields, found list"):
        load_recipe(path, registry)


def test_missing_file(tmp_path: Path, registry: Registry) -> None:
    with pytest.raises(RecipeError, match="cannot read file"):
        load_recipe(tmp_path / "nope.yaml", registry)


def test_format_path() -> None:
    assert format_path(("stages", 2, "amount")) == "stages[2].amount"
    assert format_path(()) == ""


def test_committed_schema_is_current(registry: Registry) -> None:
    committed = json.loads((ROOT / "recipes" / "recipe.schema.json").read_text())
    assert committed == recipe_model(registry).model_json_schema()


def test_schema_is_a_discriminated_union_with_descriptions(registry: Registry) -> None:
    schema = recipe_model(registry).model_json_schema()
    items = schema["properties"]["stages"]["items"]
    assert items["discriminator"]["propertyName"] == "type"
    assert set(items["discriminator"]["mapping"]) == {"prune", "quantize", "distill", "deploy"}
    amount = schema["$defs"]["MagnitudePrune"]["properties"]["amount"]  # a family: one definition per method
    assert "Fraction of the chosen weights" in amount["description"]
