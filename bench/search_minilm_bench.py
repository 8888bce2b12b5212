"""Issue 26's MiniLM line: the front of ``torchslim search bench/recipes/search-minilm-openvino.yaml`` against the
hand-written ``bench/recipes/minilm-deploy-pruned.yaml``, both deployed to OpenVINO with NNCF int8, measured in one
process: the mean cosine to the float model's embeddings on the 96 eval sentences, and OpenVINO latency at batch 32,
1 and 2 threads, every model timed interleaved with the others (and with the fastest peer of
``bench/deploy_minilm_bench.py``, NNCF int8 of OpenVINO's converter compiled per input shape, for the ratio the
issue quotes).

The search's models are read back from their trial folders as the search deployed them (``torchslim.load_model``);
the hand-written recipe's float model (built once, minutes of distillation, kept in ``--handwritten``) goes through
the deploy and ``nncf`` stages as ``bench/deploy_minilm_bench.py`` deploys it. A front point *dominates* the
hand-written model at a thread count when its cosine is at least the hand-written's and its latency is lower: both
the ratio of medians and the median of paired ratios above 1.

    python -m bench.search_minilm_bench [--search runs/search-minilm] [--rounds 30] [--also 3,8]
    python -m bench.search_minilm_bench --agreement bench/results/search-minilm-s13-run*.json
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

from torch import nn

import torchslim
from bench import peers
from bench.adapters import text
from bench.deploy_bench import paired, scored, timings
from bench.deploy_minilm_bench import CALIBRATION_SENTENCES, deployed
from bench.disjoint import check_disjoint, check_splits
from bench.harness import RECIPES, load_bench_recipe
from torchslim.engine.macs import count_macs
from torchslim.engine.stage import Context

HANDWRITTEN = "hand-written: minilm-deploy-pruned, openvino nncf int8"
PEER = "peer: openvino + nncf int8 (transformer), compiled per input shape"
ROOT = Path(__file__).resolve().parents[1]


def handwritten_float(folder: Path) -> nn.Module:
    """The hand-written recipe's pruned and distilled float model: read back from the run folder ``folder``
    (``torchslim.load_model``: the architecture rebuilt from its recipe, the tensors loaded with
    ``weights_only=True``), or run there first (minutes of distillation)."""
    if not (folder / "model.pt").exists():
        recipe = load_bench_recipe(RECIPES / "minilm-deploy-pruned.yaml")
        torchslim.run(recipe, folder, overwrite=True)
    return torchslim.load_model(folder).eval()


def front_models(search: Path, also: list[int]) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Each trial of the search's front (full runs that meet the constraints), and the trials ``also`` names, as the
    search deployed them, and what the search recorded of each (values, figures, whether it is on the front)."""
    front = json.loads((search / "front.json").read_text())
    trials = {t["trial"]: t for t in front["trials"]}
    models, records = {}, {}
    for number in dict.fromkeys([*front["front"], *also]):
        record = trials[number]
        name = f"search trial {number}"
        models[name] = torchslim.load_model(search / record["folder"]).eval()
        records[name] = {
            "trial": number,
            "values": record["values"],
            "objectives": record.get("objectives"),
            "final": record.get("final"),
            "seconds": record.get("seconds"),
            "on_front": number in front["front"],
        }
    return models, records


def context() -> Context:
    """The eval sentences and 128 WordNet calibration sentences (checked disjoint), as the deploy benchmark's."""
    from torchslim.examples import minilm

    data = text.loaders(train_sentences=0, batch_size=32, wordnet=CALIBRATION_SENTENCES)
    check_splits(data)
    example = next(iter(data["eval"]))[0]
    return Context(
        original=minilm.model(),
        data=data,
        example_inputs=example,
        evaluate=lambda m: minilm.cosine(m, data["eval"]),
        log=logging.getLogger("bench"),
    )


def verdicts(scores: dict[str, float], runs: list[dict[str, Any]], front: list[str]) -> list[dict[str, Any]]:
    """Per front point and thread count: cosine and latency against the hand-written model's, and whether it dominates."""
    out = []
    for name in front:
        for run in runs:
            ms = run["median_ms"]
            faster, faster_paired = ms[HANDWRITTEN] / ms[name], paired(run, HANDWRITTEN, name)
            out.append(
                {
                    "variant": name,
                    "threads": run["threads"],
                    "cosine": scores[name],
                    "cosine_handwritten": scores[HANDWRITTEN],
                    "ms": ms[name],
                    "ms_handwritten": ms[HANDWRITTEN],
                    "x_faster_than_handwritten": faster,
                    "x_faster_than_handwritten_paired": faster_paired,
                    "x_faster_than_peer": ms[PEER] / ms[name],
                    "dominates": scores[name] >= scores[HANDWRITTEN] and faster > 1 and faster_paired > 1,
                }
            )
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists without ties (timings and MAC counts here have none)."""
    ranks = [sorted(xs).index for xs in (a, b)]
    n = len(a)
    squares = sum((ranks[0](x) - ranks[1](y)) ** 2 for x, y in zip(a, b, strict=True))
    return 1 - 6 * squares / (n * (n * n - 1))


def agreement(results: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per thread count, how well what the search knew of its timed trials (its latency: against its reference
    where it had one, and then also as each trial timed it alone; the MACs) ranks them against this benchmark's
    interleaved medians (the median over ``results``, runs of this script)."""
    names = list(results[0]["front"])
    finals = [results[0]["front"][n]["final"] for n in names]
    figures = [("search_latency", "latency_ms"), ("macs", "macs")]
    if all("latency_alone_ms" in final for final in finals):
        figures.insert(1, ("search_latency_alone", "latency_alone_ms"))
    out = {}
    for index, run in enumerate(results[0]["timings"]):
        timed = [statistics.median(r["timings"][index]["median_ms"][n] for r in results) for n in names]
        out[run["threads"]] = {figure: round(spearman([final[key] for final in finals], timed), 3) for figure, key in figures}
    return out


def main() -> None:
    """Load the front and the hand-written model, score and time them interleaved, save and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", type=Path, default=ROOT / "runs" / "search-minilm")
    parser.add_argument("--handwritten", type=Path, default=ROOT / "runs" / "minilm-handwritten")
    parser.add_argument("--rounds", type=int, default=30)
    # a trial's latency in the search is one timing beside whatever else ran: time these off-front trials too (say,
    # those at the hand-written's cosine) to see whether the search's own timing left a dominating one off its front
    parser.add_argument("--also", type=lambda text: [int(n) for n in text.split(",")], default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search-minilm.json")
    parser.add_argument("--agreement", type=Path, nargs="+", help="only print agreement() over these result files")
    args = parser.parse_args()
    if args.agreement:
        print(json.dumps(agreement([json.loads(path.read_text()) for path in args.agreement])))
        return
    start = time.time()
    ctx = context()
    calibration = [ids for ids, _ in list(ctx.data["calibration"])[:4]]
    check_disjoint(ctx.data["eval"], peer_calibration=calibration)
    models, records = front_models(args.search, args.also)
    small = handwritten_float(args.handwritten)
    # MACs as the search counts them (its first example, one row): the original's must equal the search's baseline's
    macs = {"original": count_macs(ctx.original, ctx.example_inputs[:1]), HANDWRITTEN: count_macs(small, ctx.example_inputs[:1])}
    macs.update({name: record["final"]["macs"] for name, record in records.items()})
    models[HANDWRITTEN] = deployed(small, ctx, "openvino", "nncf")
    models[PEER] = peers.per_shape(
        peers.nncf_int8(ctx.original, ctx.example_inputs, calibration, transformer=True), ctx.example_inputs
    )
    scores, sizes = scored(models, ctx)
    runs = [{"batch": len(ctx.example_inputs), **timings(models, ctx.example_inputs, threads, args.rounds)} for threads in (1, 2)]
    front = [name for name in models if name in records]
    result = {
        "search": str(args.search.resolve().relative_to(ROOT)),
        "front": records,
        "scores": scores,
        "size_bytes": sizes,
        "macs": macs,
        "timings": runs,
        "rounds": args.rounds,
        "sequence": int(ctx.example_inputs.shape[1]),
        "cpus": os.cpu_count(),
        "seconds": round(time.time() - start, 1),
        "verdicts": verdicts(scores, runs, front),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for verdict in result["verdicts"]:
        print(
            f"{verdict['variant']}{'' if records[verdict['variant']]['on_front'] else ' (off the front)'} @ "
            f"{verdict['threads']} thr: cosine {verdict['cosine']:.4f} "
            f"(hand-written {verdict['cosine_handwritten']:.4f}), {verdict['ms']:.2f} ms "
            f"(hand-written {verdict['ms_handwritten']:.2f}; x{verdict['x_faster_than_handwritten']:.2f}, paired "
            f"x{verdict['x_faster_than_handwritten_paired']:.2f}; x{verdict['x_faster_than_peer']:.2f} the peer): "
            f"{'dominates' if verdict['dominates'] else 'does not dominate'}"
        )
    for run in runs:
        print(
            f"{run['threads']} thr: load {run['load_before']} -> {run['load_after']}; "
            f"hand-written {run['median_ms'][HANDWRITTEN]:.2f} ms, peer {run['median_ms'][PEER]:.2f} ms "
            f"(hand-written x{run['median_ms'][PEER] / run['median_ms'][HANDWRITTEN]:.2f} the peer)"
        )


if __name__ == "__main__":
    main()
