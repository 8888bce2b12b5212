"""Select on one split, report on another: the validation loader, keep best / patience, compare's choices."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchslim
from torchslim import RecipeError, Registry
from torchslim.compare.finished import environment_change, finished_report
from torchslim.compare.pareto import best, fronts, selection_key
from torchslim.engine.environment import environment
from torchslim.engine.recipe import validate
from torchslim.engine.saving import MODEL_FILE
from torchslim.engine.specs import DataSpec, build_data
from torchslim.engine.yamlio import Document
from torchslim.examples import digits
from torchslim.plugins.distill import DistillStage

from .conftest import digits_recipe, make_ctx

#: One torch thread for the whole module (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def same_loader_twice() -> dict[str, Any]:
    """A data factory whose validation loader is its eval loader (refused)."""
    data = digits.loaders()
    return {**data, "validation": data["eval"]}


def test_build_data_keeps_a_validation_loader_and_refuses_the_eval_one() -> None:
    data = build_data(DataSpec(target="torchslim.examples.digits:loaders", kwargs={"validation_fraction": 0.2}))
    assert set(data) == {"train", "calibration", "eval", "validation"}
    assert len(data["validation"].dataset) == 359 and len(data["eval"].dataset) == 360
    with pytest.raises(RecipeError, match="returned the eval loader as its validation loader"):
        build_data(DataSpec(target="tests.test_selection:same_loader_twice"))


def test_digits_validation_comes_out_of_train_and_leaves_eval_alone() -> None:
    plain, held = digits.split(), digits.split(validation_fraction=0.2)
    assert torch.equal(plain["eval"].tensors[0], held["eval"].tensors[0])
    assert len(held["train"]) + len(held["validation"]) == len(plain["train"])


class Scripted:
    """A metric that returns scripted scores, one per call, so a test knows which epoch is best where."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = iter(scores)

    def __call__(self, _model: nn.Module) -> float:
        return next(self.scores)


def scripted_ctx(model: nn.Module, flat: dict, eval_scores: list[float], validation: list[float] | None) -> Any:
    ctx = make_ctx(model, flat, evaluate=Scripted(eval_scores))
    ctx.validate = Scripted(validation) if validation is not None else None
    return ctx


@pytest.mark.parametrize(
    ("validation", "best_epoch", "split", "says"),
    [
        ([60.0, 90.0, 80.0, 70.0], 1, "validation", "chose on the validation data; the summary reports the eval data"),
        (None, 3, "eval", "chose on the eval data, the same data the summary reports"),
    ],
    ids=["validation-chooses", "eval-chooses"],
)
def test_keep_best_chooses_on_validation_when_there_is_some(
    trained_mlp: nn.Module, flat: dict, validation: Any, best_epoch: int, split: str, says: str
) -> None:
    # The eval scores rise while the validation scores fall: the two splits pick different epochs.
    ctx = scripted_ctx(trained_mlp, flat, [60.0, 70.0, 80.0, 90.0], validation)
    DistillStage(epochs=3, keep="best").apply(copy.deepcopy(trained_mlp), ctx)
    assert ctx.metrics["best_epoch"] == best_epoch and ctx.metrics["selected_on"] == split
    assert any(says in note for note in ctx.notes)


def test_patience_stops_on_validation_not_on_eval(trained_mlp: nn.Module, flat: dict) -> None:
    ctx = scripted_ctx(trained_mlp, flat, [60.0, 70.0, 80.0, 90.0, 95.0], [50.0, 90.0, 80.0, 70.0, 60.0])
    DistillStage(epochs=4, patience=2).apply(copy.deepcopy(trained_mlp), ctx)
    assert ctx.metrics["epochs_run"] == 3  # validation got worse twice after epoch 1; eval kept rising
    assert any("patience chose on the validation data" in note for note in ctx.notes)


def test_keep_last_without_patience_chooses_nothing_and_says_nothing(trained_mlp: nn.Module, flat: dict) -> None:
    ctx = make_ctx(trained_mlp, flat)
    DistillStage(epochs=1).apply(copy.deepcopy(trained_mlp), ctx)
    assert "selected_on" not in ctx.metrics and not any("chose" in note for note in ctx.notes)


def test_a_run_with_validation_data_reports_the_validation_score_of_every_row() -> None:
    recipe = digits_recipe([{"type": "distill", "epochs": 1, "keep": "best"}])
    recipe["data"]["kwargs"]["validation_fraction"] = 0.2
    recipe["metrics"] = {"collect": False}
    report = torchslim.run(recipe, registry=Registry.load(autoload=False))
    assert all("validation_accuracy" in row.metrics for row in report.rows)
    assert any("chose on the validation data" in note for note in report.notes)


def final(accuracy: float, latency: float, validation: float | None = None, size: int = 1000) -> dict[str, Any]:
    figures = {"accuracy": accuracy, "latency_ms": latency, "size_bytes": size}
    return figures | ({"validation_accuracy": validation} if validation is not None else {})


def test_best_within_budget_chooses_on_validation_when_every_candidate_has_it() -> None:
    candidates = [("a", final(99.0, 1.0, validation=90.0)), ("b", final(95.0, 1.0, validation=96.0))]
    assert selection_key(candidates, "accuracy") == "validation_accuracy" and best(candidates, "accuracy") == "b"
    without = [("a", final(99.0, 1.0)), ("b", final(95.0, 1.0, validation=96.0))]
    assert selection_key(without, "accuracy") == "accuracy" and best(without, "accuracy") == "a"


def test_a_variant_slower_than_its_baseline_is_never_on_the_latency_front() -> None:
    finals = [final(99.0, 2.0), final(98.0, 0.5), final(97.0, 0.8)]
    baselines = [final(99.0, 1.0)] * 3
    assert fronts(finals, "accuracy") == [["size", "latency"], ["latency"], []]
    assert [("latency" in m) for m in fronts(finals, "accuracy", baselines)] == [False, True, False]


def test_compare_says_which_split_chose_the_best_variant(tmp_path: Path) -> None:
    from torchslim.compare import compare

    recipe = digits_recipe([{"type": "prune", "amount": 0.3}])
    recipe.update(metrics={"latency": False}, constraints={"max_accuracy_drop": 50.0})
    other = {**copy.deepcopy(recipe), "name": "other", "stages": [{"type": "prune", "amount": 0.5}]}
    comparison = compare([recipe, other], registry=Registry.load(autoload=False))
    assert comparison.chosen_on == "eval"
    assert any("chosen and reported on the same eval data" in line for line in comparison.summary_lines())
    for r in (recipe, other):
        r["data"]["kwargs"]["validation_fraction"] = 0.2
    comparison = compare([recipe, other], registry=Registry.load(autoload=False))
    assert comparison.chosen_on == "validation"
    assert any("chosen on the validation data" in line for line in comparison.summary_lines())


def finished(folder: Path, recipe: Any, **changes: Any) -> None:
    """A finished report of ``recipe`` in ``folder``, written under an environment with ``changes``."""
    folder.mkdir()
    (folder / MODEL_FILE).write_bytes(b"")
    report = {
        "recipe": {},
        "metric": "accuracy",
        "notes": [],
        "environment": {**environment(recipe), **changes},
        "rows": [{"stage": "baseline", "type": None, "metrics": {"accuracy": 90.0}}],
    }
    (folder / "report.json").write_text(json.dumps(report))


@pytest.mark.parametrize(
    ("changes", "reused"),
    [
        ({}, True),
        ({"torch": "2.12.0"}, False),
        ({"machine": "arm64"}, False),
        ({"cpu": "another CPU"}, False),
        ({"threads": 64}, False),
    ],
    ids=["same", "torch", "machine", "cpu", "threads"],
)
def test_a_finished_report_is_reused_only_in_the_same_environment(
    tmp_path: Path, changes: dict, reused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    document = Document(digits_recipe([{"type": "prune", "amount": 0.3}]), "<recipe>")
    recipe = validate(document, Registry.load(autoload=False))
    finished(tmp_path / "variant", recipe, **changes)
    with caplog.at_level(logging.INFO, logger="torchslim"):
        report = finished_report(tmp_path / "variant", recipe)
    assert (report is not None) is reused
    if changes:
        key, value = next(iter(changes.items()))
        assert f"{key} {value} ->" in caplog.text
    assert (environment_change(environment(recipe), {**environment(recipe), **changes}) is None) is reused
