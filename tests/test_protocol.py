"""The stage protocol as a plugin author meets it: restore records, reload checks, declared no-op stages, families."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn

import torchslim
from torchslim import Context, Registry, Stage, StageEntry, StageError
from torchslim.engine.metrics import accuracy

from .conftest import digits_recipe


class ShrinkStage(Stage):
    """Swaps the last Linear for a narrower-input one: a structural change, recorded or not."""

    type: Literal["shrink"] = "shrink"
    records: bool = True

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Replace the head by a fresh Linear with the same shape plus a scaling layer around it."""
        name, head = _last_linear(model)
        _set(model, name, nn.Sequential(nn.Identity(), nn.Linear(head.in_features, head.out_features)))
        if self.records:
            ctx.record_for_restore(head=name)
        return model

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Redo the swap when apply recorded it (the tensors are loaded after)."""
        if "head" in record:
            head = model.get_submodule(record["head"])
            _set(model, record["head"], nn.Sequential(nn.Identity(), nn.Linear(head.in_features, head.out_features)))
        return model


class InspectStage(Stage):
    """Looks at the model and leaves it as it was, as it declares."""

    type: Literal["inspect"] = "inspect"
    changes_model: ClassVar[bool] = False
    tamper: bool = False

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Count the layers (and, with ``tamper``, break the promise)."""
        ctx.add_metric("layers", sum(1 for _ in model.modules()))
        ctx.note("inspect: looked at the model")
        if self.tamper:
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        return model


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


@pytest.fixture
def plugins(registry: Registry) -> Registry:
    registry.add(StageEntry("shrink", "tests", "tests:ShrinkStage", cls=ShrinkStage))
    registry.add(StageEntry("inspect", "tests", "tests:InspectStage", cls=InspectStage))
    return registry


def test_structure_change_without_record_fails_at_its_stage(plugins: Registry, tmp_path: Path) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}, {"type": "shrink", "name": "swap", "records": False}])
    with pytest.raises(
        StageError,
        match=r"stage swap: the model it returned cannot be rebuilt from its checkpoint.*"
        r"record_for_restore.*restore\(model, record\)",
    ) as caught:
        torchslim.run(recipe, tmp_path / "out", registry=plugins)
    assert "Unexpected key" in str(caught.value) or "Missing key" in str(caught.value)  # says what does not fit
    assert (tmp_path / "out" / "checkpoints" / "stage-01" / "progress.json").exists()  # the stage before it stays


def test_recorded_structure_change_reloads(plugins: Registry, tmp_path: Path, flat: dict[str, Any]) -> None:
    recipe = digits_recipe([{"type": "shrink"}])
    report = torchslim.run(recipe, tmp_path / "out", registry=plugins)
    model = torchslim.load_model(tmp_path / "out", registry=plugins)
    assert isinstance(model.get_submodule(_last_linear(model)[0].rpartition(".")[0]), nn.Sequential)
    assert accuracy(model, flat["eval"]) == pytest.approx(report.final.metrics["accuracy"])


def test_declared_no_op_stage_runs_in_a_chain_and_resumes_alike(plugins: Registry, tmp_path: Path) -> None:
    stages = [{"type": "prune", "amount": 0.5}, {"type": "inspect"}, {"type": "quantize", "dtype": "qint8"}]
    out = tmp_path / "out"
    first = torchslim.run(digits_recipe(stages), out, registry=plugins)
    inspect = first.rows[2]
    assert inspect.unchanged and not first.rows[1].unchanged
    for key in ("params", "nonzero", "size_bytes", "macs", "accuracy"):
        assert inspect.metrics[key] == first.rows[1].metrics[key]
    assert inspect.metrics["layers"] > 0 and "inspect: looked at the model" in first.notes
    assert "inspect (unchanged)" in first.table()
    assert json.loads((out / "report.json").read_text())["rows"][2]["unchanged"] is True

    # Resume after the no-op stage: the same rows (timings aside) and notes.
    for stage in ("stage-03",):
        for path in (out / "checkpoints" / stage).iterdir():
            path.unlink()
    again = torchslim.run(digits_recipe(stages), out, registry=plugins, resume=True)
    assert [(r.stage, r.type, r.unchanged) for r in again.rows] == [(r.stage, r.type, r.unchanged) for r in first.rows]
    assert [_untimed(r.metrics) for r in again.rows[:3]] == [_untimed(r.metrics) for r in first.rows[:3]]
    assert again.final.metrics["accuracy"] == first.final.metrics["accuracy"]
    assert _untimed_notes(again.notes) == _untimed_notes(first.notes)


def test_declared_no_op_stage_that_changes_the_model_fails(plugins: Registry) -> None:
    recipe = digits_recipe([{"type": "inspect", "tamper": True}])
    with pytest.raises(StageError, match="stage inspect: InspectStage declares changes_model = False, but the model"):
        torchslim.run(recipe, registry=plugins)


def test_undeclared_stage_that_changes_nothing_still_fails(plugins: Registry) -> None:
    class Idle(InspectStage):
        type: Literal["idle"] = "idle"  # type: ignore[assignment]
        changes_model: ClassVar[bool] = True

    plugins.add(StageEntry("idle", "tests", "tests:Idle", cls=Idle))
    with pytest.raises(StageError, match="stage idle: the stage changed nothing in the model"):
        torchslim.run(digits_recipe([{"type": "idle"}]), registry=plugins)


def test_each_stage_gets_its_own_context(plugins: Registry) -> None:
    report = torchslim.run(digits_recipe([{"type": "inspect"}, {"type": "prune", "amount": 0.5}]), registry=plugins)
    assert "layers" in report.rows[1].metrics and "layers" not in report.rows[2].metrics


def _untimed(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("seconds", "latency_ms")}


def _untimed_notes(notes: list[str]) -> list[str]:
    # The run's closing speed-up and the noise of its latencies are timings too.
    return [n for n in notes if not n.startswith(("speed-up of the final model", "~ marks a noisy latency"))]


def test_successful_resume_clears_the_failure_log(plugins: Registry, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(StageError):
        torchslim.run(
            digits_recipe([{"type": "prune", "amount": 0.5}, {"type": "inspect", "tamper": True}]), out, registry=plugins
        )
    assert "declares changes_model = False" in (out / "torchslim.log").read_text()
    torchslim.run(digits_recipe([{"type": "prune", "amount": 0.5}, {"type": "inspect"}]), out, registry=plugins, resume=True)
    assert not (out / "torchslim.log").exists()
