"""bench/search_minilm_bench.py and its search recipe: the recipe validates and builds its data through the
disjointness check, and a front point dominates the hand-written model only with an equal-or-better cosine and a
lower latency on both readings (ratio of medians, median of paired ratios)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.search_minilm_bench import HANDWRITTEN, PEER, agreement, spearman, verdicts
from torchslim import Registry
from torchslim.engine.recipe import load_recipe
from torchslim.engine.yamlio import read_yaml

RECIPE = Path(__file__).resolve().parents[1] / "bench" / "recipes" / "search-minilm-openvino.yaml"


def test_search_recipe_validates_and_checks_its_data() -> None:
    data = read_yaml(RECIPE).data
    assert data["data"]["target"] == "bench.disjoint:checked_data"
    # the latency objective is OpenVINO's at one thread, the thread count the benchmark's verdicts are read at first
    assert data["search"]["objectives"] == ["metric", "latency"] and data["metrics"]["threads"] == 1
    assert [s["type"] for s in data["stages"]] == ["prune", "distill", "deploy", "quantize"]
    load_recipe(data, Registry.load())


def _run(threads: int, front_ms: list[float], handwritten_ms: list[float]) -> dict[str, Any]:
    samples = {"front": front_ms, HANDWRITTEN: handwritten_ms, PEER: [30.0] * len(front_ms)}
    median = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}
    return {"threads": threads, "median_ms": median, "samples_ms": samples}


def test_dominates_needs_the_cosine_and_a_lower_latency() -> None:
    runs = [_run(1, [18.0, 18.0, 18.0], [20.0, 20.0, 20.0]), _run(2, [12.0, 13.0, 12.0], [12.0, 12.0, 12.0])]
    found = verdicts({"front": 0.955, HANDWRITTEN: 0.954, PEER: 0.997}, runs, ["front"])
    assert [(v["threads"], v["dominates"]) for v in found] == [(1, True), (2, False)]
    assert found[0]["x_faster_than_handwritten"] == 20.0 / 18.0
    worse = verdicts({"front": 0.953, HANDWRITTEN: 0.954, PEER: 0.997}, runs, ["front"])
    assert not any(v["dominates"] for v in worse)


def test_agreement_ranks_what_the_search_knew_against_the_benchmark() -> None:
    assert spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == 1.0
    assert spearman([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]) == -1.0
    front = {n: {"final": {"latency_ms": ms, "macs": macs}} for n, ms, macs in (("a", 19.0, 3), ("b", 25.0, 1), ("c", 21.0, 2))}
    # the benchmark's median over two runs orders them b < c < a: MACs agree, the search's own timing reverses them
    runs = [
        {"front": front, "timings": [{"threads": 1, "median_ms": {"a": a, "b": b, "c": c}}]}
        for a, b, c in ((30, 10, 20), (32, 12, 19))
    ]
    assert agreement(runs) == {1: {"search_latency": -1.0, "macs": 1.0}}
    for n, alone in (("a", 30.0), ("b", 10.0), ("c", 21.0)):  # a search that read its latency against a reference
        front[n]["final"]["latency_alone_ms"] = alone
    assert agreement(runs) == {1: {"search_latency": -1.0, "search_latency_alone": 1.0, "macs": 1.0}}
