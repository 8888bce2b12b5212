"""A comparison's memory: a variant (or runtime baseline) whose report is already in the output directory,
run from the same resolved recipe in the same environment, is not run again; variants that share a
model, data and measurement share one baseline."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..engine.checkpoints import recipe_hash
from ..engine.environment import environment
from ..engine.recipe import RecipeBase
from ..engine.report import Report
from ..engine.saving import MODEL_FILE
from ..engine.specs import resolved_kwargs

#: Environment facts a reused report must share with this run: its figures (latency above all)
#: hold only for the same torch, machine, CPU model and thread count.
SAME_ENVIRONMENT = ("torch", "machine", "cpu", "threads")


def environment_change(then: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """What differs between a report's environment and this run's (``torch 2.12 -> 2.13``), or None."""
    changed = [f"{key} {then.get(key)} -> {now.get(key)}" for key in SAME_ENVIRONMENT if then.get(key) != now.get(key)]
    return ", ".join(changed) or None


def finished_report(folder: Path, recipe: RecipeBase, log: logging.Logger | None = None) -> Report | None:
    """The report of a finished run of exactly ``recipe`` in ``folder`` (same recipe hash) in this
    environment (same torch version, machine, CPU and thread count), or None."""
    try:
        report = Report.read(folder)
        if report.environment["recipe_hash"] != recipe_hash(recipe) or not (folder / MODEL_FILE).exists():
            return None
    except (OSError, ValueError, KeyError, TypeError):  # missing, half-written by hand, or another format: run again
        return None
    change = environment_change(report.environment, environment(recipe))
    if change is not None:
        (log or logging.getLogger("torchslim")).info(
            "compare: %s ran under another environment (%s): running it again", folder.name, change
        )
        return None
    return report


def baseline_key(recipe: RecipeBase) -> str:
    """What a baseline depends on: recipes with the same key measure the same unchanged model."""
    data = recipe.resolved()
    shared = {k: data.get(k) for k in ("model", "data", "evaluate", "metrics", "seed", "device", "threads")}
    for part in ("model", "data"):  # the same call however it is spelled: an explicit default is no change
        spec = getattr(recipe, part)
        shared[part] = {**(shared[part] or {}), "kwargs": resolved_kwargs(spec.target, spec.kwargs, recipe.base_dir)}
    shared["base_dir"] = str(recipe.base_dir)  # a relative model checkpoint depends on it
    # the final model is timed against metrics.reference at the end; the baseline's figures do not depend on it
    shared["metrics"] = {k: v for k, v in (shared["metrics"] or {}).items() if k != "reference"}
    # repr for a default that JSON cannot write (a tuple is a list to JSON already; an object by its repr)
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=repr).encode()).hexdigest()
