"""Cheap before expensive (``search.cheap``): trials run with shorter training and part of the eval data first;
Optuna's successive halving stops the unpromising ones there, and the front is made of full runs only."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import digits_recipe, write_recipe
from torchslim import run
from torchslim.engine.errors import RecipeError
from torchslim.engine.recipe import validate
from torchslim.engine.registry import Registry
from torchslim.search import search
from torchslim.search.front import pareto
from torchslim.search.halving import at_rung, ranks
from torchslim.search.records import Record
from torchslim.search.study import keeps

pytestmark = pytest.mark.usefixtures("one_thread")
needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="pip install 'torchslim[search]'")

EPOCHS = 4
CHEAP = {"rungs": [{"epochs_scale": 0.25, "eval_fraction": 0.25}], "reduction_factor": 2}
FACTOR = 2


def halving_recipe(objectives: list[str], trials: int = 6, **search: Any) -> dict[str, Any]:
    """A tiny digits MLP pruned, then distilled for 4 epochs; 6 random trials over the amount, cheap first."""
    stages = [
        {"type": "prune", "name": "prune", "method": "magnitude", "amount": 0.5},
        {"type": "distill", "name": "recover", "teacher": "original", "epochs": EPOCHS},
    ]
    recipe = digits_recipe(stages, hidden=16, train_epochs=2)
    recipe["threads"] = 1
    recipe["metrics"] = {"collect": objectives != ["metric"], "latency": False}  # only the figures the objectives need
    recipe["search"] = {
        "space": {"stages.0.amount": {"low": 0.3, "high": 0.97}},
        "objectives": objectives,
        "trials": trials,
        "sampler": "random",
        "seed": 1,
        "cheap": CHEAP,
        **search,
    }
    return recipe


@pytest.fixture(scope="module")
def halved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Record]]:
    folder = tmp_path_factory.mktemp("halving")
    path = write_recipe(folder, halving_recipe(["metric"]))
    result = search(path, folder / "out", registry=Registry.load(autoload=False))
    return folder / "out", result.records


def _promoted_by_successive_halving(value: float, before: list[float]) -> bool:
    """Optuna's SuccessiveHalvingPruner's rule, written out (maximised): among the n trials measured at the rung,
    the best max(1, n // factor) go on."""
    competing = sorted([*before, value], reverse=True)
    return value >= competing[max(1, len(competing) // FACTOR) - 1]


@needs_optuna
def test_the_pruner_stops_poor_trials_after_their_cheap_run(halved: tuple[Path, list[Record]]) -> None:
    out, records = halved
    assert all(r.error is None for r in records)
    stopped = [r for r in records if r.stopped is not None]
    assert stopped and len(stopped) < len(records)  # some stopped early, some ran in full
    cheap: list[float] = []
    for record in records:
        rung = at_rung(record, 0)
        assert rung is not None
        assert (record.stopped is None) == _promoted_by_successive_halving(rung.objectives[0], cheap), record.number
        cheap.append(rung.objectives[0])
    folders = {p.name for p in (out / "trials").iterdir()}
    for record in stopped:  # only its cheap run ran: 1 of 4 epochs, scored on a quarter of the eval batches
        assert record.folder.endswith("-rung0") and record.folder[: -len("-rung0")] not in folders
        ran = yaml.safe_load((out / "trials" / record.folder / "recipe.yaml").read_text())
        assert ran["stages"][1]["epochs"] == math.ceil(EPOCHS * 0.25) and ran["evaluate"]["fraction"] == 0.25
    data = json.loads((out / "front.json").read_text())
    assert [t.get("stopped_after_rung") for t in data["trials"]] == [r.stopped for r in records]
    assert "stopped after a cheap run" in (out / "front.md").read_text()


@needs_optuna
def test_the_front_is_measured_in_full(halved: tuple[Path, list[Record]]) -> None:
    out, records = halved
    data = json.loads((out / "front.json").read_text())
    full = [r for r in records if r.ok]
    assert data["front"] and set(data["front"]) <= {r.number for r in full}
    # every trial that no other beat at the cheap rung went on to its full run
    cheap = [r for r in (at_rung(r, 0) for r in records) if r is not None]
    assert all(r.ok for r in records if r.number in {c.number for c in pareto(cheap, ["metric"])})
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "fraction" not in best.get("evaluate", {}) and best["stages"][1]["epochs"] == EPOCHS
    report = json.loads((out / "trials" / records[data["best"]["trial"] - 1].folder / "report.json").read_text())
    assert report["rows"][-1]["metrics"]["accuracy"] == records[data["best"]["trial"] - 1].final["accuracy"]
    reran = run(best, None, registry=Registry.load(autoload=False))  # best.yaml reproduces the full figure
    assert reran.final.metrics["accuracy"] == pytest.approx(records[data["best"]["trial"] - 1].final["accuracy"])


@needs_optuna
@pytest.mark.slow  # a second search, with MACs measured (about 11 s on the loaded 2-core machine)
def test_several_objectives_are_promoted_by_non_dominated_rank(tmp_path: Path) -> None:
    recipe = halving_recipe(["metric", "macs"], trials=5)
    recipe["stages"][0]["method"] = "structured"  # MACs change with the amount: a real trade-off
    result = search(write_recipe(tmp_path, recipe), tmp_path / "out", registry=Registry.load(autoload=False))
    cheap: list[Record] = []
    for record in result.records:
        rung = at_rung(record, 0)
        assert rung is not None
        ranked = ranks([*cheap, rung], ["metric", "macs"])
        if ranked[-1] == 0:  # on the cheap front when it was judged: always goes on
            assert record.ok, record.number
        if len(cheap) >= FACTOR and ranked[-1] > max(ranked[:-1]):  # worse than every trial before: stopped
            assert record.stopped == 0, record.number
        cheap.append(rung)


def _record(number: int, objectives: list[float], excess: float = 0.0) -> Record:
    return Record(number, {}, "", 0.0, objectives=objectives, excess={"max_accuracy_drop": excess})


def test_ranks_put_the_trials_that_miss_the_constraints_last() -> None:
    records = [
        _record(1, [90.0, 5.0]),
        _record(2, [80.0, 3.0]),
        _record(3, [70.0, 4.0]),  # 3: beaten by 2
        _record(4, [99.0, 1.0], excess=0.5),
        _record(5, [99.0, 1.0], excess=0.2),
    ]
    assert ranks(records, ["metric", "macs"]) == [0, 0, 1, 3, 2]


@needs_optuna
@pytest.mark.parametrize("others", [[], [0], [1], [0, 1, 2], [0, 0, 1, 2, 3], [3, 2, 1, 0, 0, 0]], ids=str)
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_keeps_is_optunas_successive_halving_rule(rank: int, others: list[int]) -> None:
    competing = sorted([*others, rank])
    assert keeps(rank, others, 3) == (rank <= competing[max(1, len(competing) // 3) - 1])


@pytest.mark.parametrize(
    ("cheap", "message"),
    [
        ({"rungs": [{"epochs_scale": 1.0}]}, "a cheap rung is the full run"),
        ({"rungs": [{"eval_fraction": 0.5}, {"eval_fraction": 0.25}]}, "rung 1 must cost more than rung 0"),
        ({"rungs": [{"eval_fraction": 0.5}], "reduction_factor": 1}, "reduction_factor"),
        ({"rungs": [{"eval_frac": 0.5}]}, "did you mean 'eval_fraction'"),
    ],
    ids=["full", "decreasing", "factor", "typo"],
)
def test_cheap_errors_name_the_line(tmp_path: Path, registry: Registry, cheap: dict[str, Any], message: str) -> None:
    path = write_recipe(tmp_path, halving_recipe(["metric"], cheap=cheap))
    from torchslim.engine.yamlio import read_yaml

    with pytest.raises(RecipeError) as caught:
        validate(read_yaml(path), registry)
    text = str(caught.value)
    assert message in text and f"{path}:" in text and "search.cheap" in text, text


def test_evaluate_fraction_scores_the_first_batches(registry: Registry) -> None:
    from torchslim.examples.digits import loaders, mlp

    recipe = digits_recipe([{"type": "quantize", "method": "dynamic"}], hidden=16, train_epochs=2)
    recipe["metrics"] = {"collect": False}
    recipe["evaluate"]["fraction"] = 0.25
    report = run(recipe, None, registry=registry)
    batches = list(loaders(batch_size=64)["eval"])
    kept = batches[: math.ceil(0.25 * len(batches))]
    model = mlp(hidden=16, train_epochs=2).eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in kept)
    assert report.rows[0].metrics["accuracy"] == pytest.approx(100.0 * correct / sum(len(y) for _, y in kept))


def test_a_rung_that_scales_no_epochs_is_refused(tmp_path: Path, registry: Registry) -> None:
    from torchslim.search.plan import plan

    recipe = halving_recipe(["metric"], cheap={"rungs": [{"epochs_scale": 0.5}]})
    recipe["stages"] = recipe["stages"][:1]  # magnitude pruning alone: nothing trains
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(RecipeError) as caught:
        plan(path, tmp_path / "out", 1, registry)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "epochs_scale" in text)
    assert f"{path}:{line}:" in str(caught.value) and "no stage of the recipe trains" in str(caught.value)
