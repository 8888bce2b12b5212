"""A search killed with SIGKILL in the middle of a trial, then resumed, ends with the trials of an uninterrupted
search with the same seed: the same values, the same deterministic figures (metric, size, MACs; latency is a timing)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_recipe
from tests.test_search import search_recipe

ENV = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
#: Two values of two kinds; TPE models the results after 2 random trials, so later trials depend on the history.
SPACE = {"stages.0.amount": {"low": 0.2, "high": 0.8}, "stages.1.method": {"choices": ["dynamic", "half"]}}


def _search(recipe: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchslim", "search", str(recipe), "--out", str(out), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=600,
    )


def _killed_at(recipe: Path, out: Path, at: str) -> str:
    """Start the search, SIGKILL it when stderr prints ``at`` (the trial has started); its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchslim", "search", str(recipe), "--out", str(out)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if at in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


def _trials(out: Path) -> list[tuple[int, dict, float, int, int]]:
    data = json.loads((out / "front.json").read_text())
    return [
        (t["trial"], t["values"], t["final"]["accuracy"], t["final"]["size_bytes"], t["final"]["macs"]) for t in data["trials"]
    ]


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="pip install 'torchslim[search]'")
@pytest.mark.slow  # three searches in subprocesses, one killed
def test_a_killed_search_resumes_to_the_trials_of_an_uninterrupted_one(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, search_recipe(SPACE, trials=5, startup_trials=2, seed=7))
    whole = _search(recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    _killed_at(recipe, tmp_path / "killed", "search: trial 4: ")
    assert len(json.loads((tmp_path / "killed" / "front.json").read_text())["trials"]) == 3  # trial 4 never finished
    resumed = _search(recipe, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "search: a trial was interrupted" in resumed.stderr and "search: 3 trial(s) done before" in resumed.stderr
    assert resumed.stderr.count("search: trial ") == 2 * 2  # trials 4 and 5 only: a line when each starts and ends

    assert _trials(tmp_path / "killed") == _trials(tmp_path / "whole")
    assert [p.name for p in sorted((tmp_path / "killed" / "trials").iterdir())] == [
        p.name for p in sorted((tmp_path / "whole" / "trials").iterdir())
    ]
    assert (tmp_path / "killed" / "best.yaml").read_text() == (tmp_path / "whole" / "best.yaml").read_text()


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="pip install 'torchslim[search]'")
@pytest.mark.slow  # three searches in subprocesses, one killed
def test_a_search_with_cheap_trials_killed_in_a_full_run_resumes_to_the_same_trials(tmp_path: Path) -> None:
    """search.cheap: killed while a promoted trial runs in full, the resumed search runs that trial's cheap rung
    again, promotes it again (the decision is replayed from the finished trials) and ends as the uninterrupted one."""
    cheap = {"rungs": [{"eval_fraction": 0.25}], "reduction_factor": 2}
    recipe = write_recipe(tmp_path, search_recipe(SPACE, trials=6, startup_trials=2, seed=7, cheap=cheap, objectives=["metric"]))
    whole = _search(recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    promoted = [line.split(":")[2].split()[1] for line in whole.stderr.splitlines() if ": promoted after cheap rung" in line]
    assert len(promoted) >= 2 and "stopped after cheap rung" in whole.stderr, whole.stderr  # both kinds happen

    killed_in = promoted[1]  # the second trial to go on to its full run
    _killed_at(recipe, tmp_path / "killed", f"search: trial {killed_in}: promoted")
    resumed = _search(recipe, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "search: a trial was interrupted" in resumed.stderr
    assert f"search: trial {killed_in}: promoted after cheap rung 0" in resumed.stderr

    assert _trials(tmp_path / "killed") == _trials(tmp_path / "whole")
    assert [p.name for p in sorted((tmp_path / "killed" / "trials").iterdir())] == [
        p.name for p in sorted((tmp_path / "whole" / "trials").iterdir())
    ]
    assert (tmp_path / "killed" / "best.yaml").read_text() == (tmp_path / "whole" / "best.yaml").read_text()
