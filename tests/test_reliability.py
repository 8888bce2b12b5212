"""Nothing lost, nothing executed, nothing hidden: checkpoints, resume, failures, untrusted input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import torchslim
from torchslim import CheckpointError, Registry
from torchslim.engine import names
from torchslim.engine.checkpoints import recipe_hash

from .conftest import ROOT, CliResult, digits_recipe, write_recipe

Cli = Callable[..., CliResult]
CHAIN = [{"type": "prune", "amount": 0.5}, {"type": "distill", "epochs": 1}, {"type": "quantize"}]
#: The figures that are timings: they differ between two runs of the same recipe, whatever the seed.
TIMINGS = (names.SECONDS, names.LATENCY_MS, names.LATENCY_IQR_MS, names.LATENCY_OTHERS)


def console(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m torchslim ARGS`` in a subprocess, plugin autoload off."""
    env = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torchslim", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def comparable(report: dict) -> list[dict]:
    """Rows without the figures that are timings."""
    return [{k: v for k, v in row["metrics"].items() if k not in TIMINGS} for row in report["rows"]]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("whole") / "out"
    torchslim.run(digits_recipe(CHAIN), out, registry=Registry.load(autoload=False))
    return json.loads((out / "report.json").read_text())


def test_checkpoint_after_every_stage(tmp_path: Path, registry: Registry) -> None:
    recipe = torchslim.load_recipe(digits_recipe(CHAIN), registry)
    torchslim.run(recipe, tmp_path / "out", registry=registry)
    for index in range(3):
        folder = tmp_path / "out" / "checkpoints" / f"stage-{index + 1:02d}"
        progress = json.loads((folder / "progress.json").read_text())
        assert progress["key"] == recipe_hash(recipe, index + 1)
        assert len(progress["rows"]) == index + 2
        assert (folder / "model.pt").stat().st_size > 0
    assert no_temp_files(tmp_path)


@pytest.mark.slow  # a subprocess killed mid-run, then another one resuming
def test_killed_run_resumes_with_the_same_report(tmp_path: Path, uninterrupted: dict) -> None:
    out = tmp_path / "out"
    halted = write_recipe(tmp_path, digits_recipe([*CHAIN[:2], {"type": "halt"}]), "halted.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.halt", str(halted), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert (out / "checkpoints" / "stage-02" / "progress.json").exists()
    assert not (out / "report.json").exists()
    assert no_temp_files(out)

    resumed = console("run", str(write_recipe(tmp_path, digits_recipe(CHAIN))), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: reusing 2 completed stage(s) (prune, distill)" in resumed.stderr
    assert "[1/3]" not in resumed.stderr and "[3/3] quantize: done" in resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert comparable(report) == comparable(uninterrupted)
    assert report["recipe"] == uninterrupted["recipe"]


def test_resume_ignores_checkpoints_of_a_changed_recipe(tmp_path: Path, registry: Registry, cli: Cli) -> None:
    out = tmp_path / "out"
    torchslim.run(digits_recipe(CHAIN[:1]), out, registry=registry)
    changed = digits_recipe([{"type": "prune", "amount": 0.6}])
    result = cli("run", str(write_recipe(tmp_path, changed)), "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    assert "no checkpoint in" in result.stderr and "[1/1] prune: done" in result.stderr
    assert json.loads((out / "report.json").read_text())["rows"][1]["metrics"]["sparsity"] == pytest.approx(0.6, abs=0.02)


def _interrupted(tmp_path: Path, stages: list[dict], at: str) -> str:
    """Run ``stages`` with --out, press Ctrl-C when stderr prints ``at``; returns stderr."""
    recipe = write_recipe(tmp_path, digits_recipe(stages))
    env = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # A shell that starts the test suite in the background makes children ignore SIGINT, and
    # Python keeps an inherited "ignore": give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchslim", "run", str(recipe), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if at in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return err


@pytest.mark.slow  # a subprocess interrupted by SIGINT
def test_ctrl_c_leaves_checkpoints_and_no_half_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # At "[2/3] distill: running", stage 1 is done and checkpointed.
    err = _interrupted(tmp_path, [CHAIN[0], {"type": "distill", "epochs": 30}, CHAIN[2]], "[2/3] distill: running")
    assert "1 completed stage checkpointed in" in err and "rerun with --resume" in err
    assert (out / "checkpoints" / "stage-01" / "progress.json").exists()
    assert not (out / "checkpoints" / "stage-02").exists()
    assert not (out / "report.json").exists()
    assert "KeyboardInterrupt" in (out / "torchslim.log").read_text()
    assert no_temp_files(out)


@pytest.mark.slow  # a subprocess interrupted by SIGINT
def test_ctrl_c_in_the_first_stage_says_nothing_was_checkpointed(tmp_path: Path) -> None:
    err = _interrupted(tmp_path, [{"type": "distill", "epochs": 30}, CHAIN[2]], "[1/2] distill: running")
    assert "no stage had completed, so nothing is checkpointed in" in err and "--resume" not in err


def test_failing_stage_logs_traceback_to_file(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "out"
    recipe = digits_recipe([CHAIN[0], {"type": "quantize"}, {"type": "distill", "name": "late-distill"}])
    result = cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(out))
    assert result.returncode == 1
    assert "torchslim: error: stage late-distill: the model has no trainable float parameters" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"the traceback is in {out / 'torchslim.log'}" in result.stderr
    assert "Traceback" in (out / "torchslim.log").read_text()
    for index in (1, 2):
        assert (out / "checkpoints" / f"stage-{index:02d}" / "progress.json").exists()


def test_report_records_what_makes_figures_comparable(tmp_path: Path, registry: Registry) -> None:
    report = torchslim.run(digits_recipe(CHAIN[:1]), registry=registry)
    env = report.environment
    assert env["torch"] == torch.__version__ and env["torchslim"] == torchslim.__version__
    assert env["threads"] == 2 and env["device"] == "cpu"
    assert env["recipe_hash"] == recipe_hash(torchslim.load_recipe(digits_recipe(CHAIN[:1]), registry))


def test_tampered_model_file_is_refused(tmp_path: Path, registry: Registry) -> None:
    out = tmp_path / "out"
    torchslim.run(digits_recipe(CHAIN[:1]), out, registry=registry)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    torch.save({"format": "torchslim.model/1", "structure": [{}], "state_dict": {"x": Evil()}}, out / "model.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        torchslim.load_model(out, registry)
    assert not marker.exists()


def test_yaml_bomb_exits_2_quickly(tmp_path: Path, cli: Cli) -> None:
    # 10**12 strings if expanded. No clock here (a loaded machine would fail any threshold): the
    # message says the parser refused the aliases before building anything.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert "anchors and aliases" in result.stderr


@pytest.fixture
def sneaky_models() -> Iterator[None]:
    """Forget the module ``sneaky_models`` that a test imports."""
    yield
    sys.modules.pop("sneaky_models", None)


def test_validate_no_import_runs_no_recipe_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Cli, sneaky_models: None
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "sneaky_models.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\nfrom torchslim.examples.digits import mlp\n"
    )
    recipe = digits_recipe(CHAIN[:1])
    recipe["model"]["target"] = "sneaky_models:mlp"
    path = write_recipe(tmp_path, recipe)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli("validate", "--no-import", str(path))
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    result = cli("validate", str(path))
    assert result.returncode == 0 and "targets import" in result.stdout
    assert marker.exists()


def test_validate_reports_a_target_that_does_not_import(tmp_path: Path, cli: Cli) -> None:
    recipe = digits_recipe(CHAIN[:1])
    recipe["data"]["target"] = "no_such_module_here:loaders"
    path = write_recipe(tmp_path, recipe)
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert f"{path}:" in result.stderr and "data.target: cannot import module 'no_such_module_here'" in result.stderr
    assert cli("validate", "--no-import", str(path)).returncode == 0


def test_resume_needs_out(cli: Cli) -> None:
    result = cli("run", "recipes/quickstart.yaml", "--resume")
    assert result.returncode == 2
    assert "--resume needs --out" in result.stderr
