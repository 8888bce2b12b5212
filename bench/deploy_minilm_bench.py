"""Deploying all-MiniLM-L6-v2 (issue 16): torch, ONNX Runtime and OpenVINO, float32 and int8, side by side.

Variants, timed interleaved in one process at batch 32 and batch 1 (the first eval sentence, padded to
the batch's 19 tokens), at 1 and 2 threads: torch float32 eager; torchslim's torch int8
(``recipes/minilm.yaml``: dynamic int8 Linear with 8-bit activations, int8 embedding tables); the
peers on the unpruned model as a user would make them without torchslim (``bench/peers.py``: ONNX
Runtime dynamic int8 per channel; NNCF int8, transformer scheme, OpenVINO's default precision, of
OpenVINO's own converter's IR, of the same compiled per input shape, and of the ONNX export); the same model
through torchslim's deploy stage in float32 and with the runtime quantize methods (``ort_dynamic``,
``nncf``); with ``--pruned``, torchslim's heads + feed-forward pruning with distillation
(``bench/recipes/minilm-deploy-pruned.yaml``) deployed to both runtimes with int8. Every ratio to "the
best peer" is to the fastest peer at that batch size and thread count.

Data: evaluated on the 96 bundled sentences; every int8 variant (ours and the peers) calibrated on 128
WordNet usage examples (``bench/adapters/text.py``), the pruned recipe trained on 12,000 others; none of
them an eval sentence, which ``bench/disjoint.py`` checks before anything is built.
Quality: the mean cosine of each eval sentence's embedding to the float32 model's.

    pip install -e '.[bench,onnx,openvino]'
    python -m bench.deploy_minilm_bench [--rounds 30] [--pruned] [--out bench/results/deploy_minilm.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchslim
from bench import peers
from bench.adapters import text
from bench.adapters.text import OTHER_TEXT
from bench.deploy_bench import latency_cells, load_line, paired, scored, timings
from bench.disjoint import check_disjoint, check_splits
from bench.harness import RECIPES, load_bench_recipe
from torchslim.engine.stage import Context
from torchslim.plugins.deploy import DeployStage
from torchslim.plugins.quantize import QuantizeStage

TORCH = "torch float32 eager"
#: The peers (bench/peers.py): every construction a user might take; each thread count's fastest is the one compared.
PEERS = (
    "peer: onnxruntime dynamic int8 (per channel)",
    "peer: openvino + nncf int8 (transformer)",
    "peer: openvino + nncf int8 (transformer), compiled per input shape",
    "peer: openvino + nncf int8 (transformer), from the ONNX export",
)
OURS_INT8 = ("torchslim deploy onnxruntime + ort_dynamic", "torchslim deploy openvino + nncf")
PRUNED = ("torchslim pruned + distilled, onnxruntime int8", "torchslim pruned + distilled, openvino nncf int8")
ROOT = Path(__file__).resolve().parents[1]
#: WordNet usage examples the int8 variants calibrate on: 4 batches of 32 (the nncf method's and the peers').
CALIBRATION_SENTENCES = 128


def deployed(model: nn.Module, ctx: Context, runtime: str, method: str | None) -> nn.Module:
    """``model`` through a deploy stage (batch and sequence axes dynamic) and, with ``method``, a runtime quantize stage."""
    result = DeployStage(runtime=runtime, dynamic_axes=[0, 1]).apply(model, ctx.for_stage())
    if method is not None:
        options = {"calibration_batches": 4} if method == "nncf" else {}
        result = QuantizeStage.from_options(method=method, **options).apply(result, ctx.for_stage())
    return result


def run_recipe(path: Path, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The final model of the recipe at ``path`` (no measurements: this script measures), its data checked
    disjoint from its eval sentences."""
    recipe = load_bench_recipe(path, overrides).resolved()
    recipe["metrics"] = {"collect": False}
    report = torchslim.run(recipe)
    assert report.model is not None
    return report.model.eval()


def variants(pruned: bool) -> tuple[dict[str, nn.Module], Context]:
    """Every variant, and the context (data, example batch) they were made with."""
    from torchslim.examples import minilm

    # eval: the 96 bundled sentences; calibration (ours and the peers'): WordNet usage examples, none of them an eval one
    data = text.loaders(train_sentences=0, batch_size=32, wordnet=CALIBRATION_SENTENCES)
    check_splits(data)
    original = minilm.model()
    example = next(iter(data["eval"]))[0]
    ctx = Context(
        original=original,
        data=data,
        example_inputs=example,
        evaluate=lambda m: minilm.cosine(m, data["eval"]),
        log=logging.getLogger("bench"),
    )
    calibration = [ids for ids, _ in list(data["calibration"])[:4]]
    check_disjoint(data["eval"], peer_calibration=calibration)
    int8 = run_recipe(ROOT / "recipes" / "minilm.yaml", {"data": OTHER_TEXT})
    models = {
        TORCH: original,
        "torchslim torch int8 (recipes/minilm.yaml)": int8,
        PEERS[0]: peers.ort_dynamic_int8(original, example),
        PEERS[1]: (nncf := peers.nncf_int8(original, example, calibration, transformer=True)),
        PEERS[2]: peers.per_shape(nncf, example),
        PEERS[3]: peers.nncf_int8(original, example, calibration, transformer=True, via_onnx=True),
        "onnxruntime float32": deployed(original, ctx, "onnxruntime", None),
        OURS_INT8[0]: deployed(original, ctx, "onnxruntime", "ort_dynamic"),
        "openvino float32": deployed(original, ctx, "openvino", None),
        OURS_INT8[1]: deployed(original, ctx, "openvino", "nncf"),
    }
    if pruned:
        small = run_recipe(RECIPES / "minilm-deploy-pruned.yaml")
        models.update(
            {
                "torchslim pruned + distilled, torch float32": small,
                PRUNED[0]: deployed(small, ctx, "onnxruntime", "ort_dynamic"),
                PRUNED[1]: deployed(small, ctx, "openvino", "nncf"),
            }
        )
    return models, ctx


def targets(scores: dict[str, float], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch and thread count: the best torchslim runtime int8 and the pruned variants against the best peer."""
    out = []
    for run in runs:
        ms = run["median_ms"]
        peer = min(PEERS, key=ms.__getitem__)
        entry = {
            "batch": run["batch"],
            "threads": run["threads"],
            "best_peer": peer,
            "load": [run["load_before"], run["load_after"]],
        }
        for key, group in (("int8", OURS_INT8), ("pruned", PRUNED)):
            if all(name in ms for name in group):
                ours = min(group, key=ms.__getitem__)
                entry[key] = {
                    "variant": ours,
                    "x_faster_than_peer": ms[peer] / ms[ours],
                    "x_faster_than_peer_paired": paired(run, peer, ours),
                    "cosine": scores[ours],
                    "x_faster_than_torch": ms[TORCH] / ms[ours],
                }
        out.append(entry)
    return out


def table(result: dict[str, Any]) -> str:
    """A Markdown table per batch size: variant, size, cosine, latency, x torch and x best peer at each thread count."""
    blocks = []
    for batch in sorted({r["batch"] for r in result["timings"]}, reverse=True):
        runs = [r for r in result["timings"] if r["batch"] == batch]
        head = (
            "| variant | size MB | cosine | " + " | ".join(f"{r['threads']} thr ms | x torch | x best peer" for r in runs) + " |"
        )
        lines = [f"batch {batch}:", "", head, "|" + "---|" * (3 + 3 * len(runs))]
        for name, score in result["scores"].items():
            cells = [name, f"{result['size_bytes'][name] / 1e6:.1f}", f"{score:.4f}"]
            cells += [cell for run in runs for cell in latency_cells(run, name, TORCH, PEERS, 2)]
            lines.append("| " + " | ".join(cells) + " |")
        best = "; ".join(f"{r['threads']} thr: {min(PEERS, key=r['median_ms'].__getitem__)}" for r in runs)
        blocks.append("\n".join(lines) + f"\n\nbest peer: {best}\n{load_line(runs)}; {result['rounds']} interleaved rounds")
    return "\n\n".join(blocks)


def main() -> None:
    """Build the variants, score them, time them at batch 32 and 1, 1 and 2 threads; print and save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--pruned", action="store_true", help="add the pruned + distilled variants (minutes of training)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/deploy_minilm.json"))
    args = parser.parse_args()
    start = time.time()
    models, ctx = variants(args.pruned)
    scores, sizes = scored(models, ctx)
    runs = []
    for batch in (ctx.example_inputs, ctx.example_inputs[:1]):
        for threads in (1, 2):
            runs.append({"batch": len(batch), **timings(models, batch, threads, args.rounds)})
    result = {
        "scores": scores,
        "size_bytes": sizes,
        "timings": runs,
        "rounds": args.rounds,
        "sequence": int(ctx.example_inputs.shape[1]),
        "torch_threads_default": torch.get_num_threads(),
        "seconds": round(time.time() - start, 1),
        "targets": targets(scores, runs),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
