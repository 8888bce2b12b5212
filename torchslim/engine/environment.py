"""The facts recorded with every report, so that figures are compared honestly."""

from __future__ import annotations

import platform
from typing import Any

import torch

from . import distributed
from .checkpoints import recipe_hash
from .recipe import RecipeBase
from .timing import cpu_model, load_average, usable_cpus
from .version import VERSION


def environment(recipe: RecipeBase) -> dict[str, Any]:
    """Versions and machine facts recorded in the report.

    ``load_before`` is the 1-minute load average when the run starts; the runner adds
    ``load_after`` when it ends: how busy the machine was, beside the latencies measured on it.
    """
    return {
        "torchslim": VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpus": usable_cpus(),
        "load_before": load_average(),
        "threads": recipe.metrics.threads or torch.get_num_threads(),
        "work_threads": recipe.work_threads(),
        "device": recipe.device,
        "processes": distributed.world_size(),
        "recipe_hash": recipe_hash(recipe),
    }
