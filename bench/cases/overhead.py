"""Case 4: what the engine costs. The quickstart recipe through ``torchslim.run`` (metrics collection
off: only the task metric and time, as the script computes) against :mod:`bench.handwritten`, the
same torch calls written by hand with the same seeds. Same accuracies expected, wall-time ratio."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torchslim
from bench import handwritten
from bench.disjoint import check_splits
from bench.harness import Settings, interleaved, load_bench_recipe, pick, recipe_data
from bench.report import CaseResult, Target

TITLE = "engine overhead: quickstart recipe via torchslim.run vs the same torch code by hand"
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
#: Distill options the hand-written script implements; another value would make the comparison unfair.
MIRRORED = {
    "teacher": "original",
    "student": "current",
    "optimizer": "adam",
    "weight_decay": 0.0,
    "grad_clip": None,
    "max_steps": None,
    "features": [],
    "patience": None,
    "better": "higher",
}


def missing() -> str | None:
    """Nothing beyond torchslim itself is needed."""
    return None


def overrides(settings: Settings) -> dict[str, Any]:
    """Metrics collection off; smaller training in the quick modes."""
    model = pick(settings, {}, {"kwargs": {"train_epochs": 8}}, {"kwargs": {"hidden": 64, "train_epochs": 3}})
    stages = pick(settings, {}, {}, {1: {"epochs": 1}})
    return {"metrics": {"collect": False}, "model": model, "stages": stages}


def plan_for(recipe: Any) -> handwritten.Plan:
    """The hand-written script's numbers, read from the resolved recipe (which must fit what it implements)."""
    data = recipe.resolved()
    types = [s["type"] for s in data["stages"]]
    prune_stage, distill_stage, quantize_stage = data["stages"]
    if types != ["prune", "distill", "quantize"] or quantize_stage["method"] != "dynamic" or prune_stage["scope"] != "global":
        raise ValueError(
            f"{QUICKSTART}: the hand-written script implements prune (global) + distill + quantize "
            f"(dynamic); the recipe has {types}: update bench/handwritten.py"
        )
    differs = {k: distill_stage.get(k) for k, v in MIRRORED.items() if distill_stage.get(k, v) != v}
    if differs:
        raise ValueError(f"bench/handwritten.py does not implement distill options {differs}: update it")
    kwargs = data["model"]["kwargs"]
    return handwritten.Plan(
        seed=data["seed"],
        hidden=kwargs["hidden"],
        train_epochs=kwargs["train_epochs"],
        batch_size=data["data"]["kwargs"]["batch_size"],
        amount=prune_stage["amount"],
        epochs=distill_stage["epochs"],
        temperature=distill_stage["temperature"],
        alpha=distill_stage["alpha"],
        lr=distill_stage["lr"],
        schedule=distill_stage["schedule"],
        keep=distill_stage["keep"],
    )


def run(settings: Settings) -> CaseResult:
    """Alternate the two (after one untimed warm-up run each) and compare medians and accuracies."""
    data = overrides(settings)
    # checked here, once: inside torchslim.run the check would be charged to the engine's time
    recipe = load_bench_recipe(QUICKSTART, data, checked=False)
    check_splits(recipe_data(recipe))
    plan = plan_for(recipe)
    source = recipe.resolved()
    scores: dict[str, list[float]] = {}

    def engine() -> None:
        report = torchslim.run(source)  # validation and plugin discovery included, as a user pays them
        scores["torchslim.run"] = [row.metrics[report.metric] for row in report.rows]

    def by_hand() -> None:
        scores["hand-written"] = handwritten.run(plan)[1]

    rounds, warmup = pick(settings, (15, 1), (3, 1), (1, 0))
    times = interleaved({"hand-written": by_hand, "torchslim.run": engine}, warmup=warmup, rounds=rounds, runs=1)
    return result(times, scores, settings, rounds, warmup)


def result(
    times: dict[str, list[float]], scores: dict[str, list[float]], settings: Settings, rounds: int, warmup: int
) -> CaseResult:
    """The two rows, the ratio and the targets."""
    hand = statistics.median(times["hand-written"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append(
            {
                "variant": name,
                "wall_s": median,
                "wall_x": median / hand,
                "min_s": min(values),
                "max_s": max(values),
                "accuracies": " / ".join(f"{s:.2f}" for s in scores[name]),
                "accuracy": scores[name][-1],
            }
        )
    same = scores["hand-written"] == scores["torchslim.run"]
    overhead = 100.0 * (rows[1]["wall_s"] / hand - 1.0)
    # The fastest run of each is the one a busy machine disturbed least: a second view of the same ratio.
    overhead_min = 100.0 * (rows[1]["min_s"] / rows[0]["min_s"] - 1.0)
    columns = [
        ("variant", "variant"),
        ("wall_s", "wall s (median)"),
        ("wall_x", "x hand-written"),
        ("min_s", "min s"),
        ("max_s", "max s"),
        ("accuracies", "accuracy: base / prune / distill / int8"),
    ]
    return CaseResult(
        "overhead",
        TITLE,
        columns,
        rows,
        targets=[
            Target("engine overhead % (medians)", overhead, 5.0, higher_is_better=False),
            Target("engine overhead % (fastest runs)", overhead_min, 5.0, higher_is_better=False),
            Target("identical accuracies (1 = yes)", float(same), 1.0),
        ],
        settings={
            "rounds": rounds,
            "warmup_runs": warmup,
            "recipe": str(QUICKSTART.relative_to(QUICKSTART.parents[1])),
            "overrides": overrides(settings),
            "wall_s_all": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        },
        notes=[
            f"engine overhead {overhead:+.1f}% of wall time (median of {rounds} alternating rounds; "
            f"{overhead_min:+.1f}% between the fastest runs); accuracies {'identical' if same else 'DIFFER'} "
            "after every stage"
        ],
    )
