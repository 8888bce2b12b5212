"""The runner end to end through the Python API: rows, reports, outputs, saved model, failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

import torchslim
from torchslim import Context, OutputError, Registry, Stage, StageEntry, StageError
from torchslim.examples import digits

from .conftest import digits_recipe, write_recipe

CHAIN = [
    {"type": "prune", "amount": 0.5},
    {"type": "distill", "epochs": 1},
    {"type": "quantize", "dtype": "qint8"},
]


class KeepStage(Stage):
    """A stage that returns the model untouched: the engine must not report it as done."""

    type: Literal["keep"] = "keep"

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Return the model as it is."""
        return model


class FailStage(Stage):
    """A stage whose work raises, as a buggy plugin would."""

    type: Literal["fail"] = "fail"

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Raise."""
        raise ValueError("boom")


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[torchslim.Report, Path]:
    out = tmp_path_factory.mktemp("run") / "out"
    report = torchslim.run(digits_recipe(CHAIN), out, registry=Registry.load(autoload=False))
    return report, out


def test_rows_and_metrics(chain_run: tuple[torchslim.Report, Path]) -> None:
    report, _ = chain_run
    assert [(r.stage, r.type) for r in report.rows] == [
        ("baseline", None),
        ("prune", "prune"),
        ("distill", "distill"),
        ("quantize", "quantize"),
    ]
    for row in report.rows:
        for key in ("params", "nonzero", "sparsity", "size_bytes", "macs", "latency_ms", "seconds", "accuracy"):
            assert key in row.metrics, (row.stage, key)
    prune, final = report.rows[1].metrics, report.rows[3].metrics
    assert prune["sparsity"] == pytest.approx(0.5, abs=0.02)
    # int8 weights are a quarter of float32; file overhead and a 16-byte scale per output row
    # keep this tiny model (32 hidden units) well above that.
    assert final["size_bytes"] < report.baseline.metrics["size_bytes"] * 0.7
    assert report.baseline.metrics["accuracy"] > 80


def test_report_files(chain_run: tuple[torchslim.Report, Path]) -> None:
    _, out = chain_run
    data = json.loads((out / "report.json").read_text())
    assert data["rows"][0]["type"] is None
    assert [r["stage"] for r in data["rows"]] == ["baseline", "prune", "distill", "quantize"]
    assert data["recipe"]["stages"][0]["amount"] == 0.5
    assert data["environment"]["torch"] == torch.__version__
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("stage,type,params,nonzero")
    assert len(csv_lines) == 5
    markdown = (out / "report.md").read_text()
    assert "| quantize" in markdown and "## Notes" in markdown
    assert not list(out.glob(".*.tmp"))


def test_saved_model_gives_same_outputs(chain_run: tuple[torchslim.Report, Path]) -> None:
    report, out = chain_run
    model = torchslim.load_model(out, Registry.load(autoload=False))
    loader = digits.loaders()["eval"]
    again = torchslim.engine.metrics.accuracy(model, loader)
    assert again == pytest.approx(report.final.metrics["accuracy"])
    resolved = torchslim.load_recipe(out / "recipe.yaml", Registry.load(autoload=False))
    assert resolved.resolved() == report.recipe


def test_table_has_ratios(chain_run: tuple[torchslim.Report, Path]) -> None:
    report, _ = chain_run
    table = report.table()
    final_line = next(line for line in table.splitlines() if line.startswith("quantize"))
    ratio = report.baseline.metrics["size_bytes"] / report.final.metrics["size_bytes"]
    assert f"({ratio:.2f}x)" in final_line
    assert "note: unstructured pruning" in table


@pytest.mark.slow
def test_same_seed_same_metrics(registry: Registry) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}, {"type": "distill", "epochs": 1}])
    recipe["metrics"]["latency"] = False
    first, second = torchslim.run(recipe, registry=registry), torchslim.run(recipe, registry=registry)
    strip = lambda r: [{k: v for k, v in row.metrics.items() if k != "seconds"} for row in r.rows]  # noqa: E731
    assert strip(first) == strip(second)


def test_stage_that_changes_nothing_is_an_error(registry: Registry) -> None:
    registry.add(StageEntry("keep", "tests", "tests:KeepStage", cls=KeepStage))
    with pytest.raises(StageError, match="stage keep: the stage changed nothing"):
        torchslim.run(digits_recipe([{"type": "keep"}]), registry=registry)


def test_failing_stage_is_named(registry: Registry) -> None:
    registry.add(StageEntry("fail", "tests", "tests:FailStage", cls=FailStage))
    with pytest.raises(StageError, match="stage oops: ValueError: boom"):
        torchslim.run(digits_recipe([{"type": "fail", "name": "oops"}]), registry=registry)


def test_output_dir_with_user_files_is_not_touched(tmp_path: Path, registry: Registry) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="directory is not empty"):
        torchslim.run(digits_recipe([{"type": "prune", "amount": 0.5}]), tmp_path, registry=registry)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_checkpoint_is_loaded_safely(tmp_path: Path, registry: Registry) -> None:
    model = digits.mlp(hidden=32, train_epochs=8)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}], train_epochs=0)
    recipe["model"]["checkpoint"] = "weights.pt"  # relative to the recipe file
    report = torchslim.run(write_recipe(tmp_path, recipe), registry=registry)
    assert report.baseline.metrics["accuracy"] > 80


def test_pickle_checkpoint_that_runs_code_is_refused(tmp_path: Path, registry: Registry) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    torch.save({"weight": Evil()}, tmp_path / "evil.pt")
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}], train_epochs=0)
    recipe["model"]["checkpoint"] = "evil.pt"
    with pytest.raises(torchslim.CheckpointError, match="refused to load"):
        torchslim.run(write_recipe(tmp_path, recipe), registry=registry)
    assert not marker.exists()


def test_bad_target_is_located(tmp_path: Path, registry: Registry) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}])
    recipe["model"]["target"] = "torchslim.examples.digits:nope"
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(torchslim.RecipeError, match=rf"{path}:\d+:\d+: model.target: module 'torchslim.examples.digits' has no"):
        torchslim.run(path, registry=registry)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error path cannot be shown")
def test_cuda_without_gpu_is_a_recipe_error(tmp_path: Path, registry: Registry) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}])
    recipe["device"] = "cuda"
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(torchslim.RecipeError, match=rf"{path}:\d+:\d+: device: 'cuda' was asked for, but torch sees no CUDA"):
        torchslim.run(path, registry=registry)
