"""Shared fixtures: a fresh registry per test, and small recipes on the bundled digits."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from torchslim import Context, Registry
from torchslim.engine.metrics import accuracy
from torchslim.examples import digits

FAST_METRICS = {"warmup": 1, "runs": 2, "batch_size": 8}


@pytest.fixture
def registry() -> Registry:
    """Built-in stages only: tests do not depend on what else is installed."""
    return Registry.load(autoload=False)


@pytest.fixture(scope="module")
def images() -> dict:
    """The bundled digits as 1 x 8 x 8 images (for CNNs), shared by a test module."""
    return digits.loaders(batch_size=64, image=True)


@pytest.fixture(scope="module")
def flat() -> dict:
    """The bundled digits as 64-value vectors (for MLPs), shared by a test module."""
    return digits.loaders(batch_size=64)


@pytest.fixture(scope="module")
def trained_mlp() -> nn.Module:
    """A 64-32-32-10 MLP trained 5 epochs on the digits, shared by a test module (copy it before changing it)."""
    return digits.mlp(hidden=32, train_epochs=5)


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight of every Linear layer of ``model``, in order."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def make_ctx(model: nn.Module, data: dict[str, Any], evaluate: Any = None) -> Context:
    """A stage context over ``data`` whose original model is a copy of ``model``; accuracy on eval by default."""
    return Context(original=copy.deepcopy(model).eval(), data=data, example_inputs=next(iter(data["eval"]))[0],
                   evaluate=evaluate or (lambda m: accuracy(m.eval(), data["eval"])), log=logging.getLogger("test"))


def digits_recipe(stages: list[dict[str, Any]], **model_kwargs: Any) -> dict[str, Any]:
    """A small, fast recipe on the bundled digits with the given stages."""
    kwargs = {"hidden": 32, "train_epochs": 8, **model_kwargs}
    return {
        "name": "test",
        "seed": 0,
        "model": {"target": "torchslim.examples.digits:mlp", "kwargs": kwargs},
        "data": {"target": "torchslim.examples.digits:loaders", "kwargs": {"batch_size": 64}},
        "evaluate": {"metric": "accuracy"},
        "metrics": dict(FAST_METRICS),
        "stages": stages,
    }


def write_recipe(folder: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    """Write ``recipe`` as YAML into ``folder`` and return its path."""
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
