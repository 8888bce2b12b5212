"""The facts recorded with every report, so that figures are compared honestly."""

from __future__ import annotations

import platform
from typing import Any

import torch

from . import distributed
from .checkpoints import recipe_hash
from .recipe import RecipeBase
from .version import VERSION


def environment(recipe: RecipeBase) -> dict[str, Any]:
    """Versions and machine facts recorded in the report."""
    return {
        "torchslim": VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": recipe.metrics.threads or torch.get_num_threads(),
        "device": recipe.device,
        "processes": distributed.world_size(),
        "recipe_hash": recipe_hash(recipe),
    }
