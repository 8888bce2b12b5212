"""Case 1: the bundled digits models through the quickstart chain (prune 70%, distil, int8).

The MLP runs ``recipes/quickstart.yaml`` itself (dynamic int8); the residual CNN runs
``bench/recipes/digits-resnet.yaml``, the same chain with static int8 (dynamic quantization
leaves convolutions float). Each compressed model is saved by ``torchslim.run`` and loaded back
with ``torchslim.load_model`` before it is measured against its float32 original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import RECIPES, Settings, baseline, chain, compress, load_bench_recipe, pick, recipe_data, variant_rows
from bench.report import ACCURACY_COLUMNS, LATENCY_COLUMNS, SIZE_COLUMNS, CaseResult
from torchslim.engine.metrics import accuracy, latency_batch

TITLE = "bundled digits models through the quickstart chain, against float32"
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
RECIPE_FILES = {"mlp": QUICKSTART, "resnet": RECIPES / "digits-resnet.yaml"}
LATENCY_BATCH = 32
COLUMNS = [("model", "model"), ("variant", "variant"), *SIZE_COLUMNS, *LATENCY_COLUMNS, *ACCURACY_COLUMNS]


def missing() -> str | None:
    """The digits ship with torchslim: nothing is missing."""
    return None


def overrides(settings: Settings, model: str) -> dict[str, Any]:
    """Metrics collection off (measured here instead); tiny models and one epoch in smoke mode."""
    smoke = {"mlp": {"hidden": 64, "train_epochs": 3}, "resnet": {"width": 8, "train_epochs": 2}}[model]
    return {
        "metrics": {"collect": False},
        "model": pick(settings, {}, {"kwargs": {"resnet": {"train_epochs": 6}, "mlp": {}}[model]}, {"kwargs": smoke}),
        "stages": pick(settings, {}, {}, {1: {"epochs": 1}}),
    }


def run(settings: Settings) -> CaseResult:
    """Compress each model, then time both versions of it interleaved and score them."""
    rows: list[dict[str, Any]] = []
    notes = []
    for label in pick(settings, list(RECIPE_FILES), list(RECIPE_FILES), ["mlp"]):  # smoke: the MLP only
        path = RECIPE_FILES[label]
        recipe = load_bench_recipe(path, overrides(settings, label))
        original = baseline(recipe)
        compressed, report, seconds = compress(recipe, settings)
        loaders = recipe_data(recipe)
        batch = latency_batch(next(iter(loaders["eval"]))[0], LATENCY_BATCH)
        models = {"float32": original, chain(recipe): compressed}
        found = variant_rows(models, lambda m, b=batch: m(b), lambda m, d=loaders: accuracy(m, d["eval"]), settings, "accuracy")
        for row in found:
            row["model"] = label
        rows.extend(found)
        notes.append(
            f"{label}: {path.name}, compressed in {seconds:.1f}s; engine's per-stage accuracy: "
            + ", ".join(f"{r.stage} {r.metrics['accuracy']:.2f}" for r in report.rows)
        )
    return CaseResult(
        "digits",
        TITLE,
        COLUMNS,
        rows,
        settings={
            "latency_batch": LATENCY_BATCH,
            "warmup": settings.warmup,
            "rounds": settings.rounds,
            "runs_per_round": settings.runs,
        },
        notes=notes,
    )
