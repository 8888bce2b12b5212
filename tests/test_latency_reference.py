"""A latency read against a reference timed in turns: ``metrics.reference`` in a run, ``search.latency_reference``
in a search (the reference run once, each trial's latency the reference's over their paired ratio, a resume
reusing it)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import CliResult, digits_recipe, write_recipe
from torchslim import Registry, load_recipe, run
from torchslim.compare.finished import baseline_key
from torchslim.engine import names
from torchslim.engine.errors import RecipeError
from torchslim.engine.report import Report
from torchslim.search import search

pytestmark = pytest.mark.usefixtures("one_thread")
needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="pip install 'torchslim[search]'")
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="pip install 'torchslim[onnx]'")

PRUNE = {"type": "prune", "name": "prune", "method": "structured", "amount": 0.5}
SPACE = {"stages.0.amount": {"low": 0.2, "high": 0.8}}


def _recipe(stages: list[dict[str, Any]], **metrics: Any) -> dict[str, Any]:
    recipe = digits_recipe(stages, train_epochs=2)
    recipe["threads"] = 1
    recipe["metrics"] = {**recipe["metrics"], "threads": 1, **metrics}
    return recipe


def test_a_run_times_its_final_model_in_turns_with_the_reference(tmp_path: Path, registry: Registry) -> None:
    run(_recipe([PRUNE]), tmp_path / "ref", registry=registry)
    path = write_recipe(tmp_path, _recipe([dict(PRUNE, amount=0.8)], reference="ref"))  # relative to the recipe
    report = run(path, tmp_path / "out", registry=registry)
    timed = report.reference
    assert timed is not None and timed["path"] == str(tmp_path / "ref")
    assert timed["reference_ms"] > 0 and timed["final_ms"] > 0 and timed["q1"] <= timed["ratio"] <= timed["q3"]
    assert timed["rounds"] == report.recipe["metrics"]["runs"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["reference"] == timed
    assert Report.read(tmp_path / "out").reference == timed  # as a comparison reusing the run reads it back
    assert any(note.startswith(f"against the reference {tmp_path / 'ref'}") for note in report.notes)


def test_a_reference_without_a_saved_model_is_refused_at_its_line(tmp_path: Path, registry: Registry) -> None:
    path = write_recipe(tmp_path, _recipe([PRUNE], reference="nowhere"))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "reference: nowhere" in text)
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{line}:\d+: metrics.reference: .*nowhere holds no saved model"):
        run(path, tmp_path / "out", registry=registry)
    assert not (tmp_path / "out" / "report.json").exists()  # refused before any stage ran


def test_a_reference_does_not_change_the_baseline_a_run_shares(registry: Registry) -> None:
    plain, timed = _recipe([PRUNE]), _recipe([PRUNE], reference="/elsewhere")
    assert baseline_key(load_recipe(plain, registry)) == baseline_key(load_recipe(timed, registry))


def _trial_reports(out: Path) -> dict[int, dict[str, Any]]:
    return {int(p.name[:3]): json.loads((p / "report.json").read_text()) for p in (out / "trials").iterdir()}


@needs_optuna
def test_a_torch_search_reads_latency_against_the_baseline(tmp_path: Path, registry: Registry) -> None:
    recipe = _recipe([PRUNE])
    recipe["search"] = {"space": SPACE, "objectives": ["metric", "latency"], "trials": 2}
    result = search(write_recipe(tmp_path, recipe), tmp_path / "out", registry=registry)
    kept = json.loads((tmp_path / "out" / "reference.json").read_text())
    assert kept["folder"] is None and not (tmp_path / "out" / "reference").exists()
    reports = _trial_reports(tmp_path / "out")
    for record in result.records:
        report = reports[record.number]
        assert record.final[names.LATENCY_MS] == pytest.approx(kept["latency_ms"] / report["speedup"]["ratio"])
        assert record.final[names.LATENCY_ALONE_MS] == report["rows"][-1]["metrics"][names.LATENCY_MS]
        assert record.objectives[1] == record.final[names.LATENCY_MS]


@needs_optuna
def test_the_reference_is_timed_on_the_threads_parallel_trials_get(tmp_path: Path, registry: Registry) -> None:
    recipe = _recipe([PRUNE], threads=2)  # two threads asked; --jobs 2 gives each trial one core
    recipe["search"] = {"space": SPACE, "objectives": ["metric", "latency"], "trials": 2}
    records = search(write_recipe(tmp_path, recipe), tmp_path / "out", jobs=2, registry=registry).records
    kept = json.loads((tmp_path / "out" / "reference.json").read_text())
    assert all(r.ok and r.baseline[names.LATENCY_MS] == kept["latency_ms"] for r in records)  # one baseline, theirs


@needs_optuna
@needs_ort
def test_a_deployed_search_runs_its_reference_once_and_resumes_with_it(tmp_path: Path, registry: Registry) -> None:
    recipe = _recipe([PRUNE, {"type": "deploy", "name": "deploy", "runtime": "onnxruntime"}])
    recipe["search"] = {"space": SPACE, "objectives": ["metric", "latency"], "trials": 2}
    path, out = write_recipe(tmp_path, recipe), tmp_path / "out"
    first = search(path, out, registry=registry).records
    kept = json.loads((out / "reference.json").read_text())
    assert kept["folder"] == str((out / "reference").resolve())
    reference = json.loads((out / "reference" / "report.json").read_text())
    assert [row["type"] for row in reference["rows"]] == [None, "deploy"]  # the baseline, deployed: no prune
    assert kept["latency_ms"] == reference["rows"][-1]["metrics"][names.LATENCY_MS]
    reports = _trial_reports(out)
    for record in first:
        timed = reports[record.number]["reference"]
        assert timed["path"] == kept["folder"]
        assert record.final[names.LATENCY_MS] == pytest.approx(kept["latency_ms"] / timed["ratio"])
    assert "reference" not in yaml.safe_load((out / "best.yaml").read_text())["metrics"]  # a plain recipe
    made = (out / "reference" / "report.json").stat().st_mtime_ns
    recipe["search"]["trials"] = 3
    again = search(write_recipe(tmp_path, recipe), out, resume=True, registry=registry).records
    assert again[:2] == first and len(again) == 3
    assert (out / "reference" / "report.json").stat().st_mtime_ns == made  # not run again
    assert reports.keys() < _trial_reports(out).keys()


@needs_optuna
def test_turned_off_each_trial_is_timed_alone(tmp_path: Path, registry: Registry) -> None:
    recipe = _recipe([PRUNE])
    recipe["search"] = {"space": SPACE, "objectives": ["metric", "latency"], "trials": 1, "latency_reference": False}
    [record] = search(write_recipe(tmp_path, recipe), tmp_path / "out", registry=registry).records
    assert not (tmp_path / "out" / "reference.json").exists() and names.LATENCY_ALONE_MS not in record.final
    assert record.final[names.LATENCY_MS] == _trial_reports(tmp_path / "out")[1]["rows"][-1]["metrics"][names.LATENCY_MS]


def test_a_searched_batch_with_the_reference_is_refused_at_its_line(
    tmp_path: Path, registry: Registry, cli: Callable[..., CliResult]
) -> None:
    recipe = _recipe([PRUNE])
    space = {**SPACE, "metrics.batch_size": {"choices": [1, 8]}}
    recipe["search"] = {"space": space, "objectives": ["metric", "latency"], "trials": 1}
    path = write_recipe(tmp_path, recipe)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "metrics.batch_size" in text) + 1
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{line}:\d+: search: metrics.batch_size is searched, .*"):
        search(path, tmp_path / "out", registry=registry)
    assert not (tmp_path / "out").exists()  # refused before the folder was made
    checked = cli("validate", str(path))  # validate makes the search's own checks
    assert checked.returncode == 2 and f"recipe.yaml:{line}:" in checked.stderr and "Traceback" not in checked.stderr
    recipe["search"]["latency_reference"] = False  # each trial timed alone at its own batch: accepted
    assert load_recipe(write_recipe(tmp_path, recipe), registry).search is not None
