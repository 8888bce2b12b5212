"""torchslim sensitivity: probes per layer and per group of coupled channels on a real tiny model, the cache,
the command's exit codes, the knapsack's budget, the per-unit options, and a search's per-layer space."""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import digits_recipe, write_recipe
from torchslim import Registry
from torchslim.engine.errors import RecipeError, StageError
from torchslim.engine.recipe import RecipeBase, validate
from torchslim.engine.yamlio import Document
from torchslim.search.allocation import Option, allocate, bounds, stage_options, total
from torchslim.search.per_unit import expand
from torchslim.search.plan import plan
from torchslim.search.sensitivity import measure
from torchslim.search.sensitivity_files import knapsack
from torchslim.search.space import fold

pytestmark = pytest.mark.usefixtures("one_thread")
needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="pip install 'torchslim[search]'")

PRUNE = {"type": "prune", "name": "prune", "method": "structured", "amount": 0.5, "scope": "layer"}
KBIT = {"type": "quantize", "name": "q", "method": "kbit", "bits": 2}
#: The digits MLP's layers (an nn.Sequential 64 -> 32 -> 32 -> 10).
LAYERS = ["0", "2", "4"]


def recipe(*stages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The digits MLP (3 epochs) with ``stages``."""
    return {**digits_recipe([dict(s) for s in stages], train_epochs=3), "threads": 1, **extra}


def validated(data: dict[str, Any], registry: Registry) -> RecipeBase:
    return validate(Document(data, "<test>"), registry)


@pytest.fixture(scope="module")
def passes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """One pass over a structured prune and a 2-bit quantize of the digits MLP (shared by the tests that read it)."""
    out = tmp_path_factory.mktemp("sensitivity")
    found = measure(validated(recipe(PRUNE, KBIT), Registry.load(autoload=False)), out, batches=2)
    return out, found


def test_a_bigger_amount_or_fewer_bits_lose_more(passes: tuple[Path, Any]) -> None:
    _, found = passes
    prune, quantize = found.stages
    assert (prune.unit_kind, quantize.unit_kind) == ("group", "layer")
    assert prune.units and set(prune.units) <= set(LAYERS)  # the groups, by root layer; the output layer is left alone
    for unit in prune.units:
        errors = [prune.probe(unit, a).error for a in (0.25, 0.5, 0.75)]
        assert errors[0] < errors[1] < errors[2], (unit, errors)
        assert prune.probe(unit, 0.75).cost > prune.probe(unit, 0.25).cost > 0  # parameters removed
    assert quantize.units == LAYERS
    for unit in LAYERS:
        assert quantize.probe(unit, 1).error > quantize.probe(unit, 4).error > quantize.probe(unit, 8).error
        assert quantize.probe(unit, 8).error < 0.05
    assert quantize.uniform.error > max(quantize.probe(u, 2).error for u in LAYERS)  # every layer at once loses more


def test_the_pass_is_cached_per_model_and_settings(passes: tuple[Path, Any], registry: Registry) -> None:
    out, first = passes
    again = measure(validated(recipe(PRUNE, KBIT), registry), out, batches=2)
    assert [s.cached for s in again.stages] == [True, True]
    assert [s.probes for s in again.stages] == [s.probes for s in first.stages]
    other = measure(validated(recipe(KBIT), registry), out, batches=2, settings=[2, 8])  # other settings, no prune before
    assert other.stages[0].cached is False and other.stages[0].settings == [2.0, 8.0]


def test_the_knapsack_stays_within_the_budget_and_finds_the_least_loss() -> None:
    rng = random.Random(0)
    for _ in range(30):
        options = {f"u{i}": [Option(s, rng.randint(1, 50) * s, rng.random() / s) for s in (1, 2, 4, 8)] for i in range(4)}
        capacity = rng.uniform(sum(min(o.cost for o in v) for v in options.values()), 300)
        chosen = allocate(options, capacity)
        assert chosen is not None and total(options, chosen, "cost") <= capacity
        best = min(
            total(options, dict(zip(options, c, strict=True)), "loss")
            for c in itertools.product(*[[o.setting for o in v] for v in options.values()])
            if total(options, dict(zip(options, c, strict=True)), "cost") <= capacity
        )
        assert total(options, chosen, "loss") <= best * 1.05 + 1e-9  # the cost grid may cost a little
    assert allocate({"a": [Option(1, 10, 0.1)]}, 5) is None  # even the cheapest is over
    options = {
        "big": [Option(1, 100, 0.5), Option(2, 200, 0.4), Option(4, 400, 0.01)],
        "small": [Option(1, 10, 0.9), Option(8, 80, 0.0)],
    }
    chosen = allocate(options, 220)
    assert chosen == {"big": 1, "small": 8}  # 180 of 220: "big" at 2 would leave "small" at 1, losing more
    assert bounds(options, chosen, 220) == {"big": [1, 2], "small": [1, 8]}  # 4 bits for "big" cannot fit


def test_the_knapsack_of_a_real_pass_fits_the_stage_as_written(passes: tuple[Path, Any]) -> None:
    _, found = passes
    for sens in found.stages:
        chosen = knapsack(sens)
        options, capacity = stage_options(sens)
        assert chosen is not None and set(chosen) == set(sens.units)
        assert total(options, chosen, "cost") <= capacity * (1 + 1e-9)
        assert (
            total(options, chosen, "loss") <= total(options, {u: sens.uniform.setting for u in sens.units}, "loss")
            if all(sens.probe(u, sens.uniform.setting) for u in sens.units)
            else True
        )


def test_a_group_allocation_keeps_no_more_parameters_than_the_uniform_prune(passes: tuple[Path, Any]) -> None:
    """Groups share layers (net 2's inputs are group 0's channels): counted alone, their removals overlap."""
    from torchslim import run

    chosen = knapsack(passes[1].stages[0])
    assert chosen is not None
    uniform = run(recipe(PRUNE)).rows[-1].metrics["params"]
    allocated = run(recipe({**PRUNE, "group_amounts": chosen})).rows[-1].metrics["params"]
    assert allocated <= uniform, (chosen, allocated, uniform)


def test_layer_bits_and_group_amounts_are_checked(registry: Registry) -> None:
    with pytest.raises(RecipeError, match=r"bits must be 1\.\.8 \(0: 0\)"):
        validated(recipe({**KBIT, "layer_bits": {"0": 0}}), registry)
    with pytest.raises(RecipeError, match="group_amounts sets each group's own amount: it needs scope: layer"):
        validated(recipe({**PRUNE, "scope": "global", "group_amounts": {"0": 0.5}}), registry)
    from torchslim import run

    with pytest.raises(StageError, match=r"layer_bits: 9 matches no layer this stage quantizes \(0, 2, 4\)"):
        run(recipe({**KBIT, "layer_bits": {"9": 4}}))
    with pytest.raises(StageError, match=r"group_amounts: x0 names no group of coupled channels"):
        run(recipe({**PRUNE, "group_amounts": {"x0": 0.5}}))
    report = run(recipe({**KBIT, "layer_bits": {"0": 8, "4": 1}}))
    assert any("bits per layer (layer_bits): 0 8, 4 1" in note for note in report.notes)


def test_group_amounts_prune_each_group_by_its_own_amount() -> None:
    from torchslim import run

    model = run(recipe({**PRUNE, "group_amounts": {"0": 0.5, "2": 0.0}})).model
    assert (model[0].out_features, model[2].out_features) == (16, 32)  # 32 hidden units each before


def test_group_amounts_of_zero_everywhere_change_nothing_and_say_so() -> None:
    from torchslim import run

    report = run(recipe({**PRUNE, "group_amounts": {"*": 0.0}}))
    assert (report.model[0].out_features, report.model[2].out_features) == (32, 32)
    assert any("changed nothing: group_amounts gives every group" in n for n in report.notes)
    with pytest.raises(StageError, match="no channel could be removed"):  # asked for a cut that cannot happen
        run(recipe({**PRUNE, "exclude": ["0", "2"]}))


def test_the_command_prints_writes_and_refuses_bad_input(cli: Any, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, recipe(KBIT))
    result = cli("sensitivity", str(path), "--out", str(tmp_path / "out"), "--batches", "1", "--settings", "2,8")
    assert result.returncode == 0, result.stderr
    assert "bits 2" in result.stdout and "bits 8" in result.stdout and "knapsack" in result.stdout
    assert "cost:" in result.stdout
    data = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert [s["units"] for s in data["stages"]] == [LAYERS] and data["seconds"] > 0
    assert (tmp_path / "out" / "sensitivity.md").is_file() and (tmp_path / "out" / "sensitivity.png").is_file()
    again = cli("sensitivity", str(path), "--out", str(tmp_path / "out"), "--batches", "1", "--settings", "2,8")
    assert "read from the cache" in again.stdout
    bad = [
        (["--batches", "0"], "--batches 0: give at least 1"),
        (["--settings", "two"], "--settings: expected numbers"),
        (["--stage", "3"], "--stage 3: stage 3 is not one that can be measured"),
    ]
    for args, message in bad:
        refused = cli("sensitivity", str(path), "--out", str(tmp_path / "o2"), *args)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    dynamic = write_recipe(tmp_path, recipe({"type": "quantize", "method": "dynamic"}), "dynamic.yaml")
    refused = cli("sensitivity", str(dynamic), "--out", str(tmp_path / "o3"))
    assert refused.returncode == 2 and "no stage can be measured per layer or group" in refused.stderr


def _search(tmp_path: Path, space: dict[str, Any], registry: Registry, *stages: dict[str, Any]) -> Any:
    data = recipe(*stages, search={"space": space, "objectives": ["metric", "size"], "trials": 2})
    return plan(write_recipe(tmp_path, data), tmp_path / "search", 1, registry)


def test_a_per_layer_space_expands_to_the_models_layers(tmp_path: Path, registry: Registry) -> None:
    searched = _search(
        tmp_path,
        {
            "stages.1.layer_bits": {"per_layer": {"choices": [1, 2, 4, 8]}},
            "stages.0.group_amounts": {"per_group": {"low": 0.0, "high": 0.6}},
        },
        registry,
        PRUNE,
        KBIT,
    )
    expanded, first = expand(searched, registry, logging.getLogger("torchslim"))
    space = expanded.spec.space
    assert [p for p in space if p.startswith("stages.1.layer_bits[")] == [f"stages.1.layer_bits[{n}]" for n in LAYERS]
    groups = [p for p in space if p.startswith("stages.0.group_amounts[")]
    assert groups and all(space[p].low == 0.0 or space[p].choices == [0.0] for p in groups)
    assert all(set(space[f"stages.1.layer_bits[{n}]"].choices or []) <= {1, 2, 4, 8} for n in LAYERS)
    assert first is not None and set(fold(first)) == {"stages.0.group_amounts", "stages.1.layer_bits"}
    assert set(fold(first)["stages.1.layer_bits"]) == set(LAYERS)
    assert (tmp_path / "search" / "sensitivity.json").is_file()


def test_a_cut_searched_before_lifts_the_bits_budget_as_written(tmp_path: Path, registry: Registry) -> None:
    binary = {"type": "quantize", "name": "q", "method": "binary"}
    bits = {"stages.1.layer_bits": {"per_layer": {"choices": [1, 2, 8]}}}
    log = logging.getLogger("torchslim")
    (tmp_path / "alone").mkdir(), (tmp_path / "both").mkdir()
    alone, _ = expand(_search(tmp_path / "alone", bits, registry, PRUNE, binary), registry, log)
    # Under the binary budget as written, every layer at 1 bit is the only allocation that fits.
    assert all(alone.spec.space[f"stages.1.layer_bits[{n}]"].choices == [1] for n in LAYERS)
    cut = {"stages.0.group_amounts": {"per_group": {"choices": [0.0, 0.25]}}, **bits}
    both, _ = expand(_search(tmp_path / "both", cut, registry, PRUNE, binary), registry, log)
    # A searched cut frees weights, so wider settings stay in the space (as far as their loss allows).
    assert any(len(both.spec.space[f"stages.1.layer_bits[{n}]"].choices or []) > 1 for n in LAYERS)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"stages.1.bits": {"per_layer": {"choices": [1, 2]}}},
            r"q takes its per-layer values in layer_bits: write stages\.1\.layer_bits",
        ),
        ({"stages.1.layer_bits": {"per_group": {"choices": [1, 2]}}}, "q has one value per layer: write per_layer"),
        ({"seed": {"per_layer": {"choices": [1, 2]}}}, r"this recipe's are: stages\.0\.group_amounts, stages\.1\.layer_bits"),
    ],
    ids=["not-the-per-unit-option", "group-for-a-layer-stage", "not-a-stage"],
)
def test_per_unit_space_errors(tmp_path: Path, registry: Registry, space: dict[str, Any], message: str) -> None:
    searched = _search(tmp_path, space, registry, PRUNE, KBIT)
    with pytest.raises(RecipeError, match=message):
        expand(searched, registry, logging.getLogger("torchslim"))


@needs_optuna
def test_a_search_starts_from_the_knapsack(tmp_path: Path, registry: Registry) -> None:
    from torchslim.search import search

    data = recipe(
        KBIT,
        search={
            "space": {"stages.0.layer_bits": {"per_layer": {"choices": [1, 2, 8]}}},
            "objectives": ["metric", "size"],
            "trials": 2,
        },
    )
    result = search(write_recipe(tmp_path, data), tmp_path / "out", registry=registry)
    found = json.loads((tmp_path / "out" / "sensitivity.json").read_text())["stages"][0]["knapsack"]
    assert result.records[0].values == {"stages.0.layer_bits": found}
    assert result.records[0].ok and len(result.records) == 2
    # front.md gives a trial's bits as its settings, in the order of the layers it names once
    text = (tmp_path / "out" / "front.md").read_text()
    assert result.answer.front
    for trial in result.answer.front:
        assert f"| stages.0.layer_bits={'+'.join(map(str, trial.values['stages.0.layer_bits'].values()))} " in text
    assert f"stages.0.layer_bits in the table: the settings of {', '.join(found)}, in that order" in text


@needs_optuna
def test_a_resumed_search_reads_the_cached_pass(tmp_path: Path, registry: Registry) -> None:
    from torchslim.search import search

    space = {"stages.0.layer_bits": {"per_layer": {"choices": [1, 8]}}}
    data = recipe(KBIT, search={"space": space, "objectives": ["metric", "size"], "trials": 1})
    first = search(write_recipe(tmp_path, data), tmp_path / "out", registry=registry)
    data["search"]["trials"] = 2
    again = search(write_recipe(tmp_path, data), tmp_path / "out", resume=True, registry=registry)
    assert again.records[0] == first.records[0] and len(again.records) == 2
    assert len(list((tmp_path / "out").glob("sensitivity-cache-*.json"))) == 1
