"""The command line: output, files and exit codes, as a user sees them.

Most tests call the CLI's ``main`` in this process (the ``cli`` fixture: the same output and exit
codes, without importing torch again); a few run the real ``python -m torchslim`` in a subprocess,
for the exit codes and error output of the console itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import ROOT, CliResult, digits_recipe, write_recipe

Cli = Callable[..., CliResult]


def torchslim(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m torchslim ARGS`` in a subprocess, plugin autoload off."""
    env = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torchslim", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_quickstart_runs_and_writes_outputs(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "out"
    result = cli("run", "recipes/quickstart.yaml", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["stage", "type"]
    assert [line.split()[0] for line in lines[2:6]] == ["baseline", "prune-70", "recover", "int8"]
    assert "[3/3] int8: done" in result.stderr
    assert {p.name for p in out.iterdir()} == {"report.json", "report.csv", "report.md", "recipe.yaml", "model.pt", "checkpoints"}
    rows = json.loads((out / "report.json").read_text())["rows"]
    base, final = rows[0]["metrics"], rows[-1]["metrics"]
    # The promise for the quickstart: at least 2x smaller, at most 2 points lost.
    assert base["size_bytes"] / final["size_bytes"] >= 2.0
    assert base["accuracy"] - final["accuracy"] <= 2.0


def test_run_refuses_non_empty_out(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = cli("run", "recipes/quickstart.yaml", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "directory is not empty" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_validate_good(cli: Cli) -> None:
    result = cli("validate", "recipes/quickstart.yaml")
    assert result.returncode == 0
    assert "valid recipe 'digits-quickstart' with 3 stages" in result.stdout


def test_validate_expands_a_sweep_and_names_every_variant(cli: Cli) -> None:
    result = cli("validate", "recipes/compare/sweep.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "valid sweep recipe 'chain-sweep' with 6 variants, each valid" in lines[0]
    assert lines[1].strip() == "chain-sweep[stages.0.method=magnitude, stages.0.amount=0.5]"
    assert len(lines) == 7


def test_validate_refuses_a_sweep_value_a_variant_cannot_take(tmp_path: Path, cli: Cli) -> None:
    text = (
        (ROOT / "recipes/compare/sweep.yaml")
        .read_text()
        .replace("stages.0.amount: [0.5, 0.7, 0.9]", "stages.0.amount: [0.5, 1.5]")
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    result = cli("validate", "--no-import", str(path))
    assert result.returncode == 2
    line = next(n for n, text in enumerate(text.splitlines(), start=1) if text.strip().startswith("stages.0.amount:"))
    assert f"{path}:{line}:" in result.stderr and "Input should be less than 1" in result.stderr
    assert "(in sweep variant chain-sweep[stages.0.method=magnitude, stages.0.amount=1.5])" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"type": "prune", "amount": 1.5}, "stages[0].amount (prune): Input should be less than 1"),
        ({"type": "magic"}, "unknown stage type 'magic'; known types: deploy, distill, prune, quantize"),
    ],
    ids=["out-of-range", "unknown-type"],
)
def test_validate_bad_exits_2_without_traceback(tmp_path: Path, stage: dict, message: str, cli: Cli) -> None:
    path = write_recipe(tmp_path, digits_recipe([stage]))
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"torchslim: error: {path}:")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_python_tag_is_refused(tmp_path: Path, cli: Cli) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert "safe loader" in result.stderr
    assert not marker.exists()


def test_missing_recipe_file(tmp_path: Path, cli: Cli) -> None:
    result = cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read file" in result.stderr


@pytest.mark.slow
def test_stage_failure_exits_1_naming_the_stage(tmp_path: Path) -> None:
    recipe = digits_recipe([{"type": "prune", "name": "convs", "amount": 0.5, "modules": ["Conv2d"]}])
    result = torchslim("run", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 1
    assert "torchslim: error: stage convs: modules ['Conv2d']" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path: Path, cli: Cli) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 0.5, "modules": ["Conv2d"]}])
    result = cli("run", "--debug", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_plugins_lists_builtins(cli: Cli) -> None:
    result = cli("plugins")
    assert result.returncode == 0
    for tag in ("prune", "quantize", "distill"):
        assert any(
            line.split()[:3] == [tag, "built-in", f"torchslim.plugins.{tag}:{tag.capitalize()}Stage"]
            for line in result.stdout.splitlines()
        ), result.stdout


def test_schema_prints_json(cli: Cli) -> None:
    result = cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["stages"]["items"]["discriminator"]["propertyName"] == "type"


def test_bad_argument_exits_2() -> None:
    result = torchslim("run")
    assert result.returncode == 2
    assert "usage:" in result.stderr
