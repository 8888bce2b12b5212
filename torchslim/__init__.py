"""torchslim: a declarative network-compression engine for PyTorch.

Write a YAML recipe (model, data, metric, stages), run it, get a stage-by-stage summary.
"""

from __future__ import annotations

from .compare import compare
from .engine.errors import (
    CheckpointError,
    OutputError,
    PluginError,
    RecipeError,
    StageError,
    TorchslimError,
    UserCodeError,
    UserInputError,
)
from .engine.recipe import RecipeBase as Recipe
from .engine.recipe import load_recipe
from .engine.registry import Registry, StageEntry
from .engine.report import Report, Row
from .engine.runner import run
from .engine.saving import load_model
from .engine.specs import DataSpec, ModelSpec, weights_will_load
from .engine.stage import Context, Stage
from .engine.version import VERSION as __version__
from .export import Exported, export_run

__all__ = [
    "CheckpointError",
    "Context",
    "DataSpec",
    "Exported",
    "ModelSpec",
    "OutputError",
    "PluginError",
    "Recipe",
    "RecipeError",
    "Registry",
    "Report",
    "Row",
    "Stage",
    "StageEntry",
    "StageError",
    "TorchslimError",
    "UserCodeError",
    "UserInputError",
    "__version__",
    "compare",
    "export_run",
    "load_model",
    "load_recipe",
    "run",
    "weights_will_load",
]
