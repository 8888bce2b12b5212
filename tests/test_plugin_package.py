"""The example plugin, really installed: pip builds and installs it, torchslim finds it by entry point.

pip installs ``examples/plugin-example`` (without dependencies, with the hatchling of this
environment) into a temporary folder; ``torchslim`` then runs in subprocesses that have the
folder on ``PYTHONPATH``, exactly as it would with the plugin installed in site-packages. Those
tests are slow (pip, then torch imported by each subprocess): CI runs them in its second step.
The stage itself is tested in this process, imported from the example's folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from torchslim import Context, StageError
from torchslim.engine.registry import AUTOLOAD_ENV

from .conftest import digits_recipe, write_recipe
from .support.pip import install_into

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "plugin-example"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder into which pip has installed the example plugin (once for this module)."""
    target = tmp_path_factory.mktemp("site")
    install_into(PLUGIN, target)
    return target


def plugin_env(site: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that sees the installed plugin."""
    env = dict(os.environ)
    env.pop(AUTOLOAD_ENV, None)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(site) + (os.pathsep + existing if existing else "")
    env.update(extra)
    return env


def torchslim(site: Path, *args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m torchslim ARGS`` with the plugin installed."""
    return subprocess.run(
        [sys.executable, "-m", "torchslim", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=plugin_env(site, **extra_env),
        timeout=300,
    )


def table_rows(output: str) -> list[list[str]]:
    """The cells of a plain tabulate table's lines (columns are separated by two or more spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in output.splitlines() if line.strip()]


@pytest.mark.slow
def test_pip_installed_the_module_and_its_entry_point(site: Path) -> None:
    assert (site / "torchslim_scale.py").is_file()
    (info,) = site.glob("torchslim_plugin_example-0.1.0.dist-info")
    assert "[torchslim.stages]\nscale = torchslim_scale:ScaleStage" in (info / "entry_points.txt").read_text()


@pytest.mark.slow
def test_plugins_command_lists_installed_plugin(site: Path, tmp_path: Path) -> None:
    result = torchslim(site, "plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row[0]: row for row in table_rows(result.stdout)}
    assert rows["scale"] == ["scale", "torchslim-plugin-example 0.1.0", "torchslim_scale:ScaleStage", "ok"]
    for tag in ("prune", "quantize", "distill"):
        assert rows[tag][1] == "built-in" and rows[tag][3] == "ok"


@pytest.mark.slow
def test_env_variable_hides_installed_plugin(site: Path, tmp_path: Path) -> None:
    result = torchslim(site, "plugins", cwd=tmp_path, **{AUTOLOAD_ENV: "1"})
    assert result.returncode == 0, result.stderr
    assert "scale" not in result.stdout
    assert "torchslim-plugin-example" not in result.stdout
    assert {row[0] for row in table_rows(result.stdout)} >= {"prune", "quantize", "distill"}


@pytest.mark.slow
def test_run_recipe_with_plugin_stage(site: Path, tmp_path: Path) -> None:
    recipe = {
        "name": "scale-plugin",
        "model": {"target": "torchslim.examples.digits:mlp", "kwargs": {"hidden": 32, "train_epochs": 2}},
        "data": {"target": "torchslim.examples.digits:loaders"},
        "metrics": {"runs": 2, "warmup": 1},
        "stages": [{"type": "scale", "factor": 0.5}],
    }
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "out"

    result = torchslim(site, "-q", "run", str(path), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert any(row[:2] == ["scale", "scale"] for row in rows), result.stdout

    report = json.loads((out / "report.json").read_text())
    assert [row["type"] for row in report["rows"]] == [None, "scale"]
    assert report["rows"][1]["metrics"]["scaled_layers"] == 3  # 64 -> 32 -> 32 -> 10
    assert report["recipe"]["stages"] == [{"type": "scale", "name": None, "factor": 0.5}]


@pytest.mark.slow
def test_validate_rejects_bad_plugin_option(site: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, digits_recipe([{"type": "scale", "factor": 0}]))
    result = torchslim(site, "validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "stages[0].factor (scale): Input should be greater than 0" in result.stderr


@pytest.fixture
def scale_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example's ``torchslim_scale`` module (the file pip installs), imported in this process."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    import torchslim_scale

    yield torchslim_scale
    sys.modules.pop("torchslim_scale", None)


def context(model: nn.Module) -> Context:
    return Context(original=model, data={}, example_inputs=torch.zeros(1, 4), evaluate=lambda m: 0.0)


def test_scale_stage_scales_linear_weights_in_place(scale_module: ModuleType) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2)))
    before = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]
    biases = [m.bias.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]
    ctx = context(model)

    stage = scale_module.ScaleStage(factor=0.25)
    assert stage.apply(model, ctx) is model
    after = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for old, layer, bias in zip(before, after, biases, strict=True):
        torch.testing.assert_close(layer.weight.detach(), old * 0.25)
        torch.testing.assert_close(layer.bias.detach(), bias)
    assert ctx.metrics == {"scaled_layers": 2}


def test_scale_stage_defaults_and_schema(scale_module: ModuleType) -> None:
    stage = scale_module.ScaleStage()
    assert (stage.type, stage.factor, stage.label) == ("scale", 0.5, "scale")
    schema = scale_module.ScaleStage.model_json_schema()
    assert schema["properties"]["factor"]["exclusiveMinimum"] == 0
    assert schema["properties"]["factor"]["description"]


def test_scale_stage_without_linear_raises_stage_error(scale_module: ModuleType) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(StageError, match="stage shrink-all: ") as caught:
        scale_module.ScaleStage(name="shrink-all").apply(model, context(model))
    assert caught.value.stage == "shrink-all"
