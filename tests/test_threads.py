"""The torch threads a run works with outside timing: the recipe's ``threads``, else its ``metrics.threads``.

A model that notes ``torch.get_num_threads()`` when it is built and in every forward pass (training or
not) goes through real runs: building it, a distill stage training it, and the measurements.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import torchslim
from torchslim import RecipeError, Registry
from torchslim.compare import compare
from torchslim.engine.timing import torch_threads
from torchslim.examples import digits

from .conftest import digits_recipe

#: What ThreadSpy saw: torch's thread count when it was built, in training and in eval forward passes.
SEEN: dict[str, set[int]] = {"build": set(), "train": set(), "eval": set()}


class ThreadSpy(nn.Module):
    """A small digits MLP that notes torch's thread count in every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.body = digits.mlp(hidden=16)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        SEEN["train" if self.training else "eval"].add(torch.get_num_threads())
        return self.body(inputs)


def spy() -> ThreadSpy:
    """The recipe's model target: notes the thread count it is built with."""
    SEEN["build"].add(torch.get_num_threads())
    return ThreadSpy()


@pytest.fixture(autouse=True)
def fresh_notes() -> Iterator[None]:
    for seen in SEEN.values():
        seen.clear()
    yield


def spy_recipe(threads: int | None, timing: int) -> dict[str, Any]:
    """A recipe on ThreadSpy with one epoch of distillation (it trains the model in place)."""
    recipe = digits_recipe([{"type": "distill", "epochs": 1, "max_steps": 3}])
    recipe["model"] = {"target": "tests.test_threads:spy"}
    recipe["metrics"]["threads"] = timing
    if threads is not None:
        recipe["threads"] = threads
    return recipe


@pytest.mark.parametrize(("threads", "around"), [(1, 2), (2, 1)], ids=["1-in-2", "2-in-1"])
def test_training_runs_on_the_recipes_threads(registry: Registry, threads: int, around: int) -> None:
    timing = 3 - threads  # the other count: timing must not leak into the work
    with torch_threads(around):
        torchslim.run(spy_recipe(threads, timing), registry=registry)
        assert torch.get_num_threads() == around  # restored after the run
    assert SEEN["build"] == {threads} and SEEN["train"] == {threads}
    assert SEEN["eval"] == {threads, timing}  # scored on the recipe's threads, timed on metrics.threads


def test_by_default_training_follows_metrics_threads(registry: Registry) -> None:
    """The bits study's case: ``metrics.threads: 1`` on a 2-thread process trains on one thread, not torch's two."""
    with torch_threads(2):
        report = torchslim.run(spy_recipe(None, 1), registry=registry)
    assert SEEN["build"] == SEEN["train"] == SEEN["eval"] == {1}
    assert report.environment["work_threads"] == 1


def test_by_default_never_more_than_torchs_setting(registry: Registry) -> None:
    """``OMP_NUM_THREADS=1``, torchrun or a ``--jobs`` share lower torch's setting: the default does not raise it."""
    with torch_threads(1):
        torchslim.run(spy_recipe(None, 2), registry=registry)
    assert SEEN["build"] == SEEN["train"] == {1} and SEEN["eval"] == {1, 2}


def test_threads_must_be_positive(registry: Registry) -> None:
    recipe = spy_recipe(0, 1)
    with pytest.raises(RecipeError, match=r"threads: Input should be greater than or equal to 1"):
        torchslim.run(recipe, registry=registry)


def test_compare_baseline_and_footer_use_the_recipes_threads(registry: Registry) -> None:
    """The shared baseline is built (trained, for digits' models) on the recipe's threads too, and the
    printed mode says which threads the variants worked and were timed with."""
    with torch_threads(2):
        comparison = compare([spy_recipe(1, 2)], registry=registry)
    assert SEEN["build"] == SEEN["train"] == {1}
    assert (
        "mode: sequential, one variant at a time; torch threads: 1 outside timing (each recipe's threads), "
        "2 while timing (its metrics.threads)"
    ) in comparison.text()
