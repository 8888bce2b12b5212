"""torchslim: a declarative network-compression engine for PyTorch.

Write a YAML recipe (model, data, metric, stages), run it, get a stage-by-stage summary.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .engine.errors import (  # noqa: E402 (the version must exist before the engine imports it)
    CheckpointError,
    OutputError,
    PluginError,
    RecipeError,
    StageError,
    TorchslimError,
    UserInputError,
)
from .engine.recipe import RecipeBase as Recipe  # noqa: E402
from .engine.recipe import load_recipe  # noqa: E402
from .engine.registry import Registry, StageEntry  # noqa: E402
from .engine.report import Report, Row  # noqa: E402
from .engine.runner import run  # noqa: E402
from .engine.saving import load_model  # noqa: E402
from .engine.specs import DataSpec, ModelSpec  # noqa: E402
from .engine.stage import Context, Stage  # noqa: E402

__all__ = [
    "CheckpointError",
    "Context",
    "DataSpec",
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
    "UserInputError",
    "__version__",
    "load_model",
    "load_recipe",
    "run",
]
