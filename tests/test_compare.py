"""torchslim compare: sweeps, one shared baseline, Pareto fronts, budgets, every export, reuse and --jobs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchslim
from torchslim import RecipeError, Registry, load_recipe
from torchslim.compare import compare
from torchslim.compare.budget import Budget as Constraints
from torchslim.compare.export import write_outputs
from torchslim.compare.finished import baseline_key
from torchslim.compare.pareto import best, front, fronts
from torchslim.compare.plot import KEY_WIDTH, key_lines
from torchslim.compare.sweep import expand
from torchslim.compare.table import Comparison
from torchslim.engine.errors import UsageError
from torchslim.engine.recipe import validate
from torchslim.engine.yamlio import Document, read_yaml

from .conftest import digits_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent
CHAIN = [{"type": "prune", "amount": 0.3}, {"type": "quantize", "method": "dynamic"}]
#: Fits the int8 and float16 variants of the fixture's comparison (about 8 and 10 kB), not the
#: dense pruned model (16.6 kB); the drop allows the 2 points that pruning 30% costs this small MLP.
BUDGET = {"max_accuracy_drop": 3.0, "max_size_mb": 0.012}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Build and train the tiny models on one thread: on a busy 2-core machine, two torch threads
    wait on each other and training an MLP took 25x longer (7.5 s instead of 0.3 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sweep_recipe(sweep: dict[str, list[Any]], mode: str = "grid", stages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    recipe = digits_recipe(stages or CHAIN)
    recipe.update(name="sw", sweep=sweep, sweep_mode=mode)
    return recipe


def variants(recipe: dict[str, Any], registry: Registry) -> list[tuple[str, Any]]:
    document = Document(recipe, "<recipe>")
    return [(v.name, r) for v, r in expand(document, validate(document, registry), registry)]


@pytest.mark.parametrize(
    ("mode", "names"),
    [
        (
            "grid",
            [
                "sw[stages.0.amount=0.3, stages.1.dtype=qint8]",
                "sw[stages.0.amount=0.3, stages.1.dtype=float16]",
                "sw[stages.0.amount=0.6, stages.1.dtype=qint8]",
                "sw[stages.0.amount=0.6, stages.1.dtype=float16]",
            ],
        ),
        ("zip", ["sw[stages.0.amount=0.3, stages.1.dtype=qint8]", "sw[stages.0.amount=0.6, stages.1.dtype=float16]"]),
    ],
    ids=["grid", "zip"],
)
def test_sweep_expansion(registry: Registry, mode: str, names: list[str]) -> None:
    recipe = sweep_recipe({"stages.0.amount": [0.3, 0.6], "stages.1.dtype": ["qint8", "float16"]}, mode)
    expanded = variants(recipe, registry)
    assert [name for name, _ in expanded] == names
    for name, validated in expanded:
        stages = validated.stage_list
        assert f"amount={stages[0].amount}" in name and f"dtype={stages[1].dtype}" in name
        assert validated.sweep is None and validated.name == name


def test_sweep_creates_missing_mappings(registry: Registry) -> None:
    recipe = sweep_recipe({"metrics.runs": [3, 4]})
    del recipe["metrics"]
    assert [r.metrics.runs for _, r in variants(recipe, registry)] == [3, 4]


@pytest.mark.parametrize(
    ("sweep", "mode", "message"),
    [
        ({"stages.0.amount": [0.3], "stages.1.dtype": ["qint8", "float16"]}, "zip", "need the same length"),
        ({"stages.5.amount": [0.3]}, "grid", "'stages.5.amount': stages has 2 entries; '5' is not an index of it"),
        ({"stages.0.amount.x": [1]}, "grid", "stages.0.amount is 0.3, not a mapping or a list"),
        (
            {"stages.0.amount": [1.5]},
            "grid",
            "stages[0].amount (prune): Input should be less than 1 (in sweep variant sw[stages.0.amount=1.5])",
        ),
        ({"name": ["a", "b"]}, "grid", "name cannot be swept"),
        ({"stages.0.amount": []}, "grid", "give at least one value"),
    ],
    ids=["zip-lengths", "bad-index", "not-a-mapping", "refused-value", "unsweepable", "empty"],
)
def test_sweep_errors(registry: Registry, sweep: dict[str, list[Any]], mode: str, message: str) -> None:
    with pytest.raises(RecipeError, match=r"^<recipe>") as info:
        variants(sweep_recipe(sweep, mode), registry)
    assert message in str(info.value)


def test_run_refuses_a_sweep(registry: Registry) -> None:
    with pytest.raises(RecipeError, match="sweep: this recipe is a sweep of several variants; run it with `torchslim compare"):
        torchslim.run(sweep_recipe({"stages.0.amount": [0.3, 0.5]}), registry=registry)


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(90, 10), (80, 5), (85, 20), (70, 6)], [True, True, False, False]),
        ([(90, 10), (90, 10), (90, 12)], [True, True, False]),
        ([(90, None), (80, 5), (95, float("nan"))], [False, True, False]),
        ([(90, 10), (90, 8)], [False, True]),
    ],
    ids=["dominated", "ties", "missing", "same-metric-cheaper"],
)
def test_pareto_front(points: list[tuple[Any, Any]], expected: list[bool]) -> None:
    assert front(points) == expected


def test_fronts_and_best_on_hand_made_rows() -> None:
    rows = [
        {"accuracy": 96.0, "size_bytes": 300_000, "latency_ms": 0.2},
        {"accuracy": 95.0, "size_bytes": 90_000, "latency_ms": 0.5},
        {"accuracy": 96.0, "size_bytes": 100_000, "latency_ms": 0.3},
        None,  # a failed variant
    ]
    assert fronts(rows, "accuracy") == [["latency"], ["size"], ["size"], []]
    named = [(str(i), m) for i, m in enumerate(rows) if m is not None]
    assert best(named, "accuracy") == "2"  # ties on accuracy go to the smaller file


def test_constraints_name_each_miss() -> None:
    budget = Constraints(max_accuracy_drop=1.0, max_size_mb=0.1, max_latency_ms=1.0, max_packed_mb=0.05, min_speedup=2)
    base = {"accuracy": 96.0, "size_bytes": 340_000, "latency_ms": 0.2}
    final = {"accuracy": 94.5, "size_bytes": 91_000, "latency_ms": 0.15}
    assert budget.failures(final, base, "accuracy") == [
        "packed size not measured (limit 0.05MB)",
        "accuracy drop 1.5 > 1",
        "speed-up 1.333x < 2x",
    ]
    assert Constraints(max_size_mb=0.1).failures(final, base, "accuracy") == []


def test_recipes_must_agree_on_the_budget(tmp_path: Path, registry: Registry) -> None:
    first, second = digits_recipe(CHAIN), digits_recipe(CHAIN)
    first.update(name="a", constraints={"max_size_mb": 1})
    second.update(name="b", constraints={"max_size_mb": 2})
    paths = [write_recipe(tmp_path, first, "a.yaml"), write_recipe(tmp_path, second, "b.yaml")]
    with pytest.raises(RecipeError, match=r"b.yaml:\d+:\d+: constraints.max_size_mb: 2.0 here but 1.0 at .*a.yaml"):
        compare(paths, registry=registry)
    with pytest.raises(UsageError, match="--jobs 0"):
        compare(paths, jobs=0, registry=registry)


def test_duplicate_stage_names_are_refused_before_any_variant_runs(tmp_path: Path, registry: Registry) -> None:
    twice = digits_recipe([{"type": "prune", "name": "cut", "amount": 0.3}, {"type": "prune", "name": "cut", "amount": 0.5}])
    twice["name"] = "twice"
    paths = [write_recipe(tmp_path, digits_recipe(CHAIN), "a.yaml"), write_recipe(tmp_path, twice, "b.yaml")]
    with pytest.raises(RecipeError, match=r"b.yaml:\d+:\d+: stages\[1\].name \(prune\): 'cut' is already the name"):
        compare(paths, tmp_path / "out", registry=registry)
    assert not (tmp_path / "out").exists()  # validated with the others, before anything ran or was written


def test_a_failed_variant_is_reported_and_the_others_run(registry: Registry) -> None:
    recipe = sweep_recipe({"stages.0.exclude": [["0"], ["*"]]}, stages=CHAIN[:1])
    comparison = compare([recipe], registry=registry)
    ok, failed = comparison.entries
    # On the latency front only if not slower than the baseline: a coin toss for a dense prune, so not asserted.
    assert ok.report is not None and ok.fronts[0] == "size"
    assert failed.report is None and failed.fronts == [] and comparison.exit_code == 1
    assert failed.error is not None and failed.error.startswith("stage prune: modules ['Linear', 'Conv2d'] (minus exclude ['*'])")
    row = comparison.table().splitlines()[-1].split()
    assert row[0] == 'sw[stages.0.exclude=["*"]]' and row[1:] == ["-"] * 6
    assert f"failed: {failed.name}: stage prune" in comparison.text()


def test_ready_comparison_recipes(registry: Registry) -> None:
    paths = sorted((ROOT / "recipes" / "compare").glob("*.yaml"))
    bits = [f"bits-{kind}{model}" for kind in ("float8", "half", "int", "ternary-binary") for model in ("-cnn", "")]
    assert [p.stem for p in paths] == [*bits, "chain", "distill", "prune", "quantize", "sweep"]
    documents = [read_yaml(p) for p in paths]
    recipes = [validate(d, registry) for d in documents]
    assert all(p.read_text().startswith("# yaml-language-server: $schema=../recipe.schema.json\n") for p in paths)
    assert len({r.constraints for r in recipes}) == 1  # one budget, so any subset of the folder compares
    assert (
        sum(len(expand(d, r, registry)) for d, r in zip(documents, recipes, strict=True)) == 10 + 16 + 16
    )  # + bits study, MLP and CNN


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Comparison, Path, list[Path]]:
    folder = tmp_path_factory.mktemp("compare")
    plain = digits_recipe(CHAIN[:1])
    plain.update(name="prune", constraints=BUDGET)
    sources = [
        write_recipe(folder, plain, "prune.yaml"),
        write_recipe(folder, sweep_recipe({"stages.1.dtype": ["qint8", "float16"]}), "sweep.yaml"),
    ]
    out = folder / "out"
    return compare(sources, out, registry=Registry.load(autoload=False)), out, sources


def test_baseline_is_measured_once_and_shared(compared: tuple[Comparison, Path, list[Path]]) -> None:
    comparison, out, _ = compared
    assert comparison.baselines_measured == 1 and len(comparison.baselines) == 1
    shared = comparison.baselines[0].metrics
    for entry in comparison.entries:
        # Latency is timed anew by every measurement: equal figures mean one measurement.
        saved = json.loads((out / entry.folder / "report.json").read_text())["rows"][0]["metrics"]
        assert saved == shared
    assert "baseline: measured 1 time(s) for 3 variant(s)" in comparison.text()


def test_table_fronts_and_best(compared: tuple[Comparison, Path, list[Path]]) -> None:
    comparison, _, _ = compared
    names = [e.name for e in comparison.entries]
    assert names == ["prune", "sw[stages.1.dtype=qint8]", "sw[stages.1.dtype=float16]"]
    lines = comparison.table().splitlines()
    assert lines[0].split()[:3] == ["variant", "size", "(x"] and lines[2].startswith("baseline")
    assert [line.split()[0] for line in lines[3:]] == names
    prune, *quantized = comparison.entries
    assert prune.failures and "size" in prune.failures[0]
    passing = [(e.name, e.final) for e in quantized if e.failures == []]
    assert passing, [e.failures for e in quantized]
    assert comparison.best == best(passing, "accuracy")
    text = comparison.text()
    assert f"best within the budget: {comparison.best}: accuracy" in text
    # The module's process runs one torch thread: the recipes (metrics.threads 2 by default) work on it, time on 2.
    assert (
        "mode: sequential, one variant at a time; torch threads: 1 outside timing (each recipe's threads), 2 while timing" in text
    )
    assert all("size" in e.fronts for e in comparison.entries if e.name == comparison.best)


def test_every_export(compared: tuple[Comparison, Path, list[Path]]) -> None:
    comparison, out, _ = compared
    data = json.loads((out / "comparison.json").read_text())
    assert [v["name"] for v in data["variants"]] == [e.name for e in comparison.entries]
    assert data["best"] == comparison.best and data["mode"]["jobs"] == 1 and data["plot"] == "comparison.png"
    assert data["variants"][1]["values"] == {"stages.1.dtype": "qint8"}
    csv_lines = (out / "comparison.csv").read_text().splitlines()
    assert csv_lines[0].startswith("variant,recipe,status,baseline,values,size_bytes,packed_bytes") and len(csv_lines) == 5
    markdown = (out / "comparison.md").read_text()
    assert "| sw[stages.1.dtype=qint8]" in markdown and "](comparison.png)" in markdown
    page = (out / "comparison.html").read_text()
    assert "<style>" in page and "sw[stages.1.dtype=float16]" in page and "data:image/png;base64," in page
    assert "<link" not in page and "<script" not in page  # self-contained
    assert {e.folder for e in comparison.entries} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".*.tmp"))


def test_png_shows_the_plot(compared: tuple[Comparison, Path, list[Path]]) -> None:
    image_module = pytest.importorskip("matplotlib.image", reason="matplotlib (the [plot] extra) is not installed")
    png = compared[1] / "comparison.png"
    assert png.stat().st_size > 20_000
    pixels = image_module.imread(str(png))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    colours = {tuple(p) for p in pixels[::7, ::7, :3].reshape(-1, 3).round(2).tolist()}
    assert len(colours) > 20  # points, lines, text: not a blank canvas
    assert (pixels[..., :3].std(axis=2) > 0.1).any()  # some coloured (not grey) pixels: the front


def test_the_plot_key_cuts_a_name_longer_than_its_column(compared: tuple[Comparison, Path, list[Path]]) -> None:
    comparison = copy.deepcopy(compared[0])
    whole = key_lines(comparison)
    comparison.entries[0].name = "x" * 300  # a per-group search trial's values run to hundreds of characters
    lines = key_lines(comparison)
    assert all(len(line) <= KEY_WIDTH for line in lines) and lines[0].endswith("...")
    assert lines[1:] == whole[1:] and all(not line.endswith("...") for line in whole)  # the short names whole


def test_without_matplotlib_the_tool_says_how_to_plot(
    compared: tuple[Comparison, Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without the extra looks like
    write_outputs(compared[0], tmp_path)
    assert not (tmp_path / "comparison.png").exists()
    assert "pip install 'torchslim[plot]'" in json.loads((tmp_path / "comparison.json").read_text())["plot"]
    assert "pip install 'torchslim[plot]'" in (tmp_path / "comparison.md").read_text()


def test_repeat_reuses_finished_variants(compared: tuple[Comparison, Path, list[Path]]) -> None:
    first, out, sources = compared
    stamps = {e.folder: (out / e.folder / "model.pt").stat().st_mtime_ns for e in first.entries}
    again = compare(sources, out, registry=Registry.load(autoload=False))
    assert all(e.reused for e in again.entries) and again.baselines_measured == 0
    assert {e.folder: (out / e.folder / "model.pt").stat().st_mtime_ns for e in again.entries} == stamps
    assert [e.final for e in again.entries] == [e.final for e in first.entries]
    assert again.best == first.best
    assert "reused 3 finished variant(s)" in again.text()


@pytest.mark.slow
def test_jobs_2_through_the_cli(tmp_path: Path) -> None:
    source = write_recipe(tmp_path, sweep_recipe({"stages.0.amount": [0.3, 0.5]}, stages=CHAIN[:1]))
    # One thread in the parent too (see one_thread); the two workers set their own share.
    env = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torchslim", "compare", str(source), "--out", str(tmp_path / "out"), "--jobs", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "mode: 2 parallel jobs" in result.stdout and "the latency of variants run in parallel is disturbed" in result.stdout
    assert "torchslim: sw[stages.0.amount=0.5]: [1/1] prune: done" in result.stderr  # from a worker process
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    data = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert data["mode"]["jobs"] == 2 and data["mode"]["threads"] == threads and data["mode"]["work_threads"] == [threads]
    for variant in data["variants"]:
        assert variant["status"] == "ran"
        report = json.loads((tmp_path / "out" / variant["report_dir"] / "report.json").read_text())
        assert report["recipe"]["metrics"]["threads"] == threads


def test_baseline_sameness_is_decided_on_resolved_kwargs(registry: Registry) -> None:
    spelled = [digits_recipe(CHAIN[:1]) for _ in range(3)]
    spelled[1]["model"]["kwargs"].update(depth=2, seed=0)  # digits.mlp's defaults, written out
    spelled[1]["data"]["kwargs"].update(eval_fraction=0.2)  # digits.loaders' default
    spelled[2]["model"]["kwargs"].update(depth=3)  # another model
    keys = [baseline_key(load_recipe(recipe, registry)) for recipe in spelled]
    assert keys[0] == keys[1] != keys[2]
