"""Shared fixtures: a fresh registry per test, small recipes on the bundled digits, the CLI in-process."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from torchslim import Context, Registry
from torchslim.engine.metrics import accuracy
from torchslim.engine.registry import AUTOLOAD_ENV
from torchslim.examples import digits

ROOT = Path(__file__).resolve().parent.parent
FAST_METRICS = {"warmup": 1, "runs": 2, "batch_size": 8}


@pytest.fixture
def registry() -> Registry:
    """Built-in stages only: tests do not depend on what else is installed."""
    return Registry.load(autoload=False)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tiny models train faster so on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    return Context(
        original=copy.deepcopy(model).eval(),
        data=data,
        example_inputs=next(iter(data["eval"]))[0],
        evaluate=evaluate or (lambda m: accuracy(m.eval(), data["eval"])),
        log=logging.getLogger("test"),
    )


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


@dataclass
class CliResult:
    """What one ``torchslim`` command returned and printed (the fields of a CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., CliResult]]:
    """``torchslim ARGS`` run in this process by ``torchslim.cli.main``, from the repository
    root with plugin autoload off: its exit code and what it printed to stdout and stderr.

    A subprocess would import torch again (seconds each); the few tests that need the real
    console (argparse's exit, a signal, torchrun, an installed plugin) still start one.
    """
    from torchslim.cli import main

    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    monkeypatch.chdir(ROOT)
    logger = logging.getLogger("torchslim")
    handlers, level = logger.handlers[:], logger.level

    def call(*args: str) -> CliResult:
        capsys.readouterr()  # only what this command prints
        logger.handlers.clear()  # main adds its stderr handler again, on the stderr captured now
        code = main(list(args))
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    yield call
    logger.handlers[:] = handlers
    logger.setLevel(level)
