"""torchslim compare across runtimes: a float32 baseline measured in each runtime a variant is deployed to,
measured once and reused, and each deployed variant's ratios against it beside those against torch."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from torchslim import Registry
from torchslim.compare import compare, runtimes
from torchslim.compare.export import to_csv
from torchslim.compare.finished import baseline_key
from torchslim.compare.plan import _recipe_files
from torchslim.compare.table import Comparison, Entry, Mode
from torchslim.engine.errors import StageError, UsageError
from torchslim.engine.recipe import validate
from torchslim.engine.report import Report, Row
from torchslim.engine.yamlio import read_yaml

from .conftest import digits_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent
HEADER = "vs runtime fp32 (x smaller, x faster)"
ORT = "onnxruntime"
ORT_LABEL = "baseline @onnxruntime"


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


needs_ort = pytest.mark.skipif(
    bool(_missing("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript or onnxruntime not installed: pip install 'torchslim[onnx]'",
)
needs_openvino = pytest.mark.skipif(
    bool(_missing("onnx", "onnxscript", "openvino", "nncf")),
    reason="openvino or nncf not installed: pip install 'torchslim[openvino]'",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as in test_compare: two threads on a busy 2-core machine wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _recipe(name: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    recipe = digits_recipe(stages)
    recipe["name"] = name
    return recipe


def _counted_compare(sources: list[Path], out: Path | None, calls: list[str]) -> Comparison:
    """compare, recording the name of every runtime baseline it runs (the variants run elsewhere)."""
    real = runtimes.run

    def counting(recipe: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(recipe.name)
        return real(recipe, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtimes, "run", counting)
        return compare(sources, out, registry=Registry.load(autoload=False))


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Comparison, Path, list[Path], list[str]]:
    """A torch variant and two variants deployed to ONNX Runtime (int8 in the runtime; pruned, then float32).

    They export with the torchscript exporter: 0.01 s for this MLP against dynamo's 1.2 s, and the
    runtime baseline must then export the same way.
    """
    if _missing("onnx", "onnxscript", "onnxruntime"):
        pytest.skip("the [onnx] extra is not installed")
    folder = tmp_path_factory.mktemp("runtimes")
    deploy = {"type": "deploy", "runtime": ORT, "exporter": "torchscript"}
    recipes = {
        "prune": [{"type": "prune", "amount": 0.3}],
        "ort-int8": [deploy, {"type": "quantize", "method": "ort_dynamic"}],
        "ort-pruned": [{"type": "prune", "amount": 0.3}, deploy],
    }
    sources = [write_recipe(folder, _recipe(name, stages), f"{name}.yaml") for name, stages in recipes.items()]
    calls: list[str] = []
    comparison = _counted_compare(sources, folder / "out", calls)
    return comparison, folder / "out", sources, calls


def _column(comparison: Comparison, header: str) -> dict[str, str]:
    """The cells of one column of the table, by the row's first cell."""
    index = comparison.headers().index(header)
    return {cells[0]: cells[index] for cells in comparison.cells()}


@needs_ort
def test_runtime_baseline_is_measured_once_for_two_variants(compared: tuple[Comparison, Path, list[Path], list[str]]) -> None:
    comparison, out, _, calls = compared
    assert calls == ["baseline@onnxruntime"] and comparison.runtime_baselines_measured == 1
    (baseline,) = comparison.runtime_baselines
    assert (baseline.label, baseline.status, baseline.variants) == (ORT_LABEL, "measured", ["ort-int8", "ort-pruned"])
    assert baseline.row is not None and baseline.row.metrics["runtime"].startswith(f"{ORT} ")
    assert [e.runtime_base for e in comparison.entries] == [None, 0, 0]
    # Measured beside the torch baseline, not instead of it: its run was given the shared torch row.
    saved = json.loads((out / "baseline@onnxruntime" / "report.json").read_text())
    assert saved["rows"][0]["metrics"] == comparison.baselines[0].metrics
    assert saved["recipe"]["stages"] == [
        {
            "type": "deploy",
            "name": None,
            "runtime": ORT,
            "opset": 18,
            "exporter": "torchscript",
            "dynamic_axes": [0],
            "static_shapes": 4,
            "tolerance": 0.0001,
        }
    ]
    assert (out / "baseline@onnxruntime" / "model.onnx").is_file()


@needs_ort
def test_deployed_variants_show_both_ratios(compared: tuple[Comparison, Path, list[Path], list[str]]) -> None:
    comparison = compared[0]
    lines = comparison.table().splitlines()
    assert HEADER in lines[0] and lines[2].startswith("baseline ") and lines[3].startswith(ORT_LABEL)
    runtime = _column(comparison, HEADER)
    assert runtime["prune"] == "-" and runtime["baseline"] == "-" and runtime[ORT_LABEL] == "-"
    for name in ("ort-int8", "ort-pruned"):
        assert re.fullmatch(r"\d+\.\d+x, \d+\.\d+x~?", runtime[name]), runtime[name]
    # The runtime's baseline row carries its own ratio to torch: what the runtime alone changes.
    assert re.search(r"\(\d+\.\d+x~?\)", _column(comparison, "latency ms (x faster)")[ORT_LABEL])
    base, int8 = comparison.runtime_baselines[0].row, comparison.entries[1].final
    assert base is not None and int8 is not None
    size = float(runtime["ort-int8"].split("x")[0])
    assert size == pytest.approx(base.metrics["size_bytes"] / int8["size_bytes"], rel=0.01) and size > 1.2
    assert f"{ORT_LABEL}: the original model in float32 in {ORT} 1." in comparison.text()
    assert "through the deploy stage of ort-int8, ort-pruned (opset 18, torchscript exporter)" in comparison.text()


@needs_ort
def test_exports_carry_the_runtime_baseline_and_ratios(compared: tuple[Comparison, Path, list[Path], list[str]]) -> None:
    out = compared[1]
    data = json.loads((out / "comparison.json").read_text())
    (baseline,) = data["runtime_baselines"]
    assert (
        baseline["label"] == ORT_LABEL and baseline["status"] == "measured" and baseline["report_dir"] == "baseline@onnxruntime"
    )
    assert baseline["metrics"]["runtime"].startswith(ORT) and baseline["ratios"]["size_bytes"] > 0
    assert data["runtime_baselines_measured"] == 1
    prune, int8, pruned = data["variants"]
    assert prune["runtime_baseline"] is None and prune["runtime_ratios"] is None
    for variant in (int8, pruned):
        assert variant["runtime_baseline"] == ORT_LABEL
        ratio = baseline["metrics"]["latency_ms"] / variant["metrics"]["latency_ms"]
        assert variant["runtime_ratios"]["latency_ms"] == pytest.approx(ratio)
    rows = {row["variant"]: row for row in csv.DictReader(io.StringIO((out / "comparison.csv").read_text()))}
    assert rows[ORT_LABEL]["status"] == "baseline" and rows[ORT_LABEL]["runtime"].startswith(ORT)
    assert rows["prune"]["runtime_baseline"] == "" and rows["prune"]["runtime_ratio_size_bytes"] == ""
    assert float(rows["ort-int8"]["runtime_ratio_size_bytes"]) > 1.2
    assert f"| {ORT_LABEL}" in (out / "comparison.md").read_text()
    assert (out / "comparison.html").read_text().count('<tr class="baseline">') == 2


@needs_ort
def test_repeat_reuses_the_runtime_baseline(compared: tuple[Comparison, Path, list[Path], list[str]]) -> None:
    first, out, sources, _ = compared
    calls: list[str] = []
    again = _counted_compare(sources, out, calls)
    assert calls == [] and again.runtime_baselines_measured == 0 and all(e.reused for e in again.entries)
    (baseline,) = again.runtime_baselines
    assert baseline.status == "reused" and baseline.row is not None
    assert baseline.row.metrics == first.runtime_baselines[0].row.metrics  # type: ignore[union-attr]
    assert _column(again, HEADER) == _column(first, HEADER)
    assert "taken from baseline@onnxruntime/ (same recipe hash, environment and runtime version)" in again.text()


@needs_ort
def test_a_runtime_baseline_that_fails_leaves_the_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(recipe: Any, *args: Any, **kwargs: Any) -> Any:
        raise StageError("deploy", "export to ONNX (dynamo exporter, opset 18) failed: made up by the test")

    monkeypatch.setattr(runtimes, "run", fails)  # the baseline's run only: the variants run through the engine
    source = write_recipe(tmp_path, _recipe("ort", [{"type": "deploy", "runtime": ORT, "exporter": "torchscript"}]))
    comparison = compare([source], registry=Registry.load(autoload=False))
    (entry,) = comparison.entries
    assert entry.report is not None and comparison.exit_code == 0
    runtime = _column(comparison, HEADER)
    assert runtime["ort"] == runtimes.NOT_MEASURED and runtime[ORT_LABEL] == runtimes.NOT_MEASURED
    assert f"{ORT_LABEL}: not measured (stage deploy: export to ONNX" in comparison.text()
    data = comparison.to_dict()
    assert data["variants"][0]["runtime_ratios"] is None and data["runtime_baselines"][0]["status"] == "failed"
    assert data["runtime_baselines_measured"] == 0


def test_not_measured_is_never_a_zero_ratio() -> None:
    """A hand-made comparison: the runtime baseline failed (its extra missing); the variant still shows."""
    metrics = {"size_bytes": 10_000, "latency_ms": 0.05, "accuracy": 95.0, "runtime": "openvino 2026.4.1"}
    report = Report(
        {},
        "accuracy",
        [
            Row("baseline", None, {"size_bytes": 20_000, "latency_ms": 0.1, "accuracy": 96.0}),
            Row("quantize", "quantize", metrics),
        ],
    )
    entry = Entry("ov", "ov", "ov.yaml", {}, 0, runtime_base=0, report=report)
    missing = runtimes.RuntimeBaseline(
        "baseline @openvino",
        "openvino",
        "baseline@openvino",
        0,
        {},
        ["ov"],
        error="stage deploy: runtime openvino: pip install 'torchslim[openvino]'",
    )
    comparison = Comparison("accuracy", [entry], [report.baseline], [["ov"]], Mode(1, 2, None), runtime_baselines=[missing])
    assert _column(comparison, HEADER) == {"baseline": "-", "baseline @openvino": "not measured", "ov": "not measured"}
    assert _column(comparison, "size (x smaller)")["ov"] == "10.0kB (2.00x)"
    assert "baseline @openvino: not measured (stage deploy: runtime openvino: pip install" in comparison.text()
    line = next(row for row in csv.DictReader(io.StringIO(to_csv(comparison))) if row["variant"] == "ov")
    assert line["runtime_baseline"] == "baseline @openvino" and line["runtime_ratio_latency_ms"] == ""


def test_a_folder_stands_for_its_recipes(tmp_path: Path) -> None:
    for name in ("b.yaml", "a.yaml", "notes.txt"):
        (tmp_path / name).write_text("")
    assert _recipe_files(tmp_path) == [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    assert _recipe_files(tmp_path / "a.yaml") == [tmp_path / "a.yaml"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"a folder without any \.yaml recipe"):
        _recipe_files(tmp_path / "empty")


def test_ready_runtime_comparison_recipes(registry: Registry) -> None:
    paths = sorted((ROOT / "recipes" / "compare" / "runtimes").glob("*.yaml"))
    recipes = [validate(read_yaml(p), registry) for p in paths]
    assert all(p.read_text().startswith("# yaml-language-server: $schema=../../recipe.schema.json\n") for p in paths)
    deployed = {r.name: runtimes.deploy_position(r) for r in recipes}
    assert deployed == {"onnxruntime-int8": 0, "openvino-int8": 0, "torch-int8": None}
    assert len({baseline_key(r) for r in recipes}) == 1  # one torch baseline for all three


@needs_ort
@needs_openvino
def test_onnxruntime_and_openvino_side_by_side(tmp_path: Path) -> None:
    deploy = {"exporter": "torchscript"}
    recipes = {
        "ort": [{"type": "deploy", "runtime": ORT, **deploy}],
        "ov-int8": [
            {"type": "deploy", "runtime": "openvino", **deploy},
            {"type": "quantize", "method": "nncf", "calibration_batches": 2},
        ],
    }
    sources = [write_recipe(tmp_path, _recipe(name, stages), f"{name}.yaml") for name, stages in recipes.items()]
    calls: list[str] = []
    comparison = _counted_compare(sources, None, calls)
    assert calls == ["baseline@onnxruntime", "baseline@openvino"]
    assert [b.label for b in comparison.runtime_baselines] == [ORT_LABEL, "baseline @openvino"]
    runtime = _column(comparison, HEADER)
    assert all(re.fullmatch(r"\d+\.\d+x, \d+\.\d+x~?", runtime[name]) for name in recipes)
    assert comparison.runtime_baselines[1].row.metrics["runtime"].startswith("openvino ")  # type: ignore[union-attr]
