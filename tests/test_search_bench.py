"""bench/search_bench.py: its hypervolume agrees with Optuna's (a private module of Optuna 5.0, used here only as a
cross-check), and the recipes it runs validate, build their data through the disjointness check and put the
hand-written recipes' int8 in the runtime."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from optuna._hypervolume import compute_hypervolume

from bench.search_bench import (
    MODELS,
    SAMPLERS,
    box_bound,
    check_data,
    dominates,
    hypervolume,
    normalised,
    pooled_hypervolume,
    reference_grid,
    result_file,
    runs_root,
    runtime_recipe,
    search_recipe,
)
from torchslim import Registry
from torchslim.engine.recipe import load_recipe


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_matches_optunas(seed: int) -> None:
    rng = random.Random(seed)
    reference = (98.0, 100.0)
    points = [(rng.uniform(97.0, 100.0), rng.uniform(0.0, 120.0)) for _ in range(rng.randint(1, 30))]
    inside = [(m, s) for m, s in points if m > reference[0] and s < reference[1]]
    expected = (
        compute_hypervolume(np.array([[-m, s] for m, s in inside]), np.array([-reference[0], reference[1]])) if inside else 0.0
    )
    assert hypervolume(points, reference) == pytest.approx(expected)


def test_hypervolume_counts_only_what_beats_the_reference() -> None:
    assert hypervolume([], (98.0, 10.0)) == 0.0
    assert hypervolume([(97.0, 1.0), (99.0, 11.0)], (98.0, 10.0)) == 0.0  # below the floor; larger than the limit
    assert hypervolume([(99.0, 5.0), (99.0, 5.0), (98.5, 6.0)], (98.0, 10.0)) == pytest.approx(5.0)  # dominated: nothing
    model = MODELS["mnist"]
    floor, limit = model.reference()
    assert normalised([(100.0, 0.0)], model) == pytest.approx(1.0)
    assert normalised([(floor + (100.0 - floor) / 2, limit / 2)], model) == pytest.approx(0.25)


def test_pooled_fronts_cover_at_least_each_runs_front() -> None:
    model = MODELS["mnist"]
    floor, limit = model.reference()
    runs = {
        "tpe-0": {"front": [{"metric": floor + 0.5, "size": limit / 2}]},
        "random-0": {"front": [{"metric": floor + 0.2, "size": limit / 8}, {"metric": floor - 1, "size": 1}]},
    }
    pooled = pooled_hypervolume(model, runs)
    alone = [normalised([(p["metric"], p["size"]) for p in r["front"]], model) for r in runs.values()]
    assert pooled is not None and pooled > max(alone) > 0  # the two fronts cover different corners
    assert pooled_hypervolume(model, runs, "tpe-") == alone[0]
    assert pooled <= box_bound(model, runs)  # no front of these points beats the best metric at the smallest size
    assert pooled_hypervolume(model, {}) is None and box_bound(model, {}) is None


def test_the_ratio_moves_with_the_reference_point() -> None:
    # TPE's one point is better in metric, random's smaller: which sampler's area is larger depends on the point
    model = MODELS["mnist"]
    floor, limit = model.reference()
    runs = {
        "tpe-0": {"front": [{"metric": floor + 0.8, "size": limit / 4}]},
        "random-0": {"front": [{"metric": floor + 0.3, "size": limit / 40}]},
    }
    grid = {(round(r["floor"] - floor, 2), r["size_fraction"]): r["tpe_over_random"] for r in reference_grid(model, runs)}
    issue_box = normalised([(floor + 0.8, limit / 4)], model) / normalised([(floor + 0.3, limit / 40)], model)
    assert grid[(0.0, 1.1)] == pytest.approx(issue_box)
    assert grid[(0.0, 1.1)] > 1 > grid[(0.0, 0.275)]  # a tighter size reference cuts TPE's point more
    assert grid[(0.5, 1.1)] is None  # random's front is below that floor: no ratio


def test_dominates_needs_no_worse_on_both_and_better_on_one() -> None:
    assert dominates({"metric": 99.0, "size": 10}, {"metric": 99.0, "size": 11})
    assert dominates({"metric": 99.1, "size": 10}, {"metric": 99.0, "size": 10})
    assert not dominates({"metric": 99.0, "size": 10}, {"metric": 99.0, "size": 10})
    assert not dominates({"metric": 99.2, "size": 12}, {"metric": 99.0, "size": 10})


def test_each_budget_keeps_its_runs_and_results_apart() -> None:
    assert runs_root(5) == runs_root() and result_file(5) == result_file()  # the first runs' folders stay put
    assert runs_root(20) != runs_root(5) and runs_root(20).name == "search_bench-20min"
    assert result_file(20) != result_file(5) and result_file(20).name == "search_bench-20min.json"
    assert result_file(20).parent == result_file(5).parent


@pytest.mark.parametrize("name", sorted(MODELS))
def test_benchmark_recipes_validate_and_check_their_data(name: str) -> None:
    registry, model = Registry.load(), MODELS[name]
    for sampler in SAMPLERS:
        recipe = search_recipe(model, sampler, 2, 5)
        check_data(recipe)
        assert recipe["search"]["sampler"] == sampler and recipe["search"]["seed"] == 2
        load_recipe(recipe, registry)
    for path in model.handwritten:
        recipe = runtime_recipe(path, model)
        check_data(recipe)
        load_recipe(recipe, registry)
        assert any(s["type"] == "deploy" for s in recipe["stages"]), path
        assert not _torch_int8(recipe["stages"]), path


def test_check_data_refuses_data_built_without_the_disjointness_check() -> None:
    recipe = search_recipe(MODELS["digits-resnet"], "tpe", 0, 5)
    recipe["data"] = recipe["data"]["kwargs"]
    with pytest.raises(ValueError, match=r"bench\.disjoint:checked_data"):
        check_data(recipe)


def _torch_int8(stages: list[dict[str, Any]]) -> bool:
    return any(s["type"] == "quantize" and s.get("method") in ("static", "dynamic") for s in stages)
