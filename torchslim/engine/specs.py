"""Recipe parts that name user code: ``module:callable`` targets for models and data."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .errors import CheckpointError, RecipeError

TARGET_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class Spec(BaseModel):
    """Base of the recipe's parts: unknown keys are errors, values cannot change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSpec(Spec):
    """Where the model comes from."""

    target: str = Field(pattern=TARGET_PATTERN)
    """A ``module:callable`` returning an ``nn.Module``, e.g. ``torchslim.examples.digits:mlp``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the callable."""
    checkpoint: str | None = None
    """Optional state_dict file (relative to the recipe), loaded with ``weights_only=True``."""


class DataSpec(Spec):
    """Where the data comes from."""

    target: str = Field(pattern=TARGET_PATTERN)
    """A ``module:callable`` returning a mapping with ``train``, ``eval`` and optionally
    ``calibration`` iterables of ``(inputs, targets)`` batches."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the callable."""


def import_target(target: str, field: str) -> Callable[..., Any]:
    """Import ``module:attr`` and return the attribute; RecipeError naming ``field`` on failure."""
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a recipe problem
        raise RecipeError(f"{field}: cannot import module '{module_name}': {type(exc).__name__}: {exc}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{field}: module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"{field}: '{target}' is not callable")
    return obj  # type: ignore[no-any-return]


def build_model(spec: ModelSpec, base_dir: Path | None, field: str = "model") -> nn.Module:
    """Call the model factory and load its checkpoint, if any."""
    factory = import_target(spec.target, f"{field}.target")
    model = factory(**spec.kwargs)
    if not isinstance(model, nn.Module):
        raise RecipeError(f"{field}.target: '{spec.target}' returned {type(model).__name__}, expected an nn.Module")
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        load_state(model, safe_load(path), str(path))
    return model


def safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: a pickle that would run code is refused."""
    try:
        with warnings.catch_warnings():
            # Loading quantized tensors goes through torch's deprecated TypedStorage and
            # quantized-tensor constructors; the warnings are torch's internals, not the user's.
            warnings.filterwarnings("ignore", message=".*(TypedStorage|quantized tensor creation).*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... on unsafe or bad files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor checkpoint loadable with weights_only=True ({first_line})"
        ) from None


def load_state(model: nn.Module, state: Any, source: str) -> None:
    """Load a state dict (or ``{"state_dict": ...}``) into ``model``, strictly."""
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected a state_dict mapping, found {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: does not fit the model: {exc}") from None


def build_data(spec: DataSpec) -> dict[str, Any]:
    """Call the data factory; check it returned ``train`` and ``eval`` (``calibration`` defaults to ``train``)."""
    factory = import_target(spec.target, "data.target")
    loaders = factory(**spec.kwargs)
    if not isinstance(loaders, Mapping):
        raise RecipeError(f"data.target: '{spec.target}' returned {type(loaders).__name__}, expected a mapping")
    missing = [key for key in ("train", "eval") if key not in loaders]
    if missing:
        raise RecipeError(f"data.target: '{spec.target}' returned no {', '.join(missing)} loader (keys: {sorted(loaders)})")
    data = dict(loaders)
    data.setdefault("calibration", data["train"])
    return data
