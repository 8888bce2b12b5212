"""Test-only: one process of a 2-process gloo run of the distill stage (started by torch.multiprocessing.spawn).

Each process joins the group through a file in the test's tmp_path, builds the same pruned
model, runs DistillStage.apply, and saves its final state dict as ``rank<R>.pt`` for the
test to compare.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchslim import Context
from torchslim.engine.metrics import accuracy
from torchslim.examples import digits
from torchslim.plugins.distill import DistillStage
from torchslim.plugins.prune import MagnitudePrune


def run_rank(rank: int, world: int, folder: str, options: dict[str, Any]) -> None:
    """Body of one process; ``options`` are DistillStage fields."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = digits.mlp(hidden=32, train_epochs=3)
        data = digits.loaders(batch_size=64)
        ctx = Context(
            original=copy.deepcopy(model).eval(),
            data=data,
            example_inputs=next(iter(data["eval"]))[0],
            evaluate=lambda m: accuracy(m.eval(), data["eval"]),
        )
        torch.manual_seed(1)
        MagnitudePrune(amount=0.8, scope="layer").apply(model, ctx)
        before = ctx.evaluate(model)
        torch.manual_seed(2)
        out = DistillStage(**options).apply(model, ctx)
        result = {"state": out.state_dict(), "before": before, "after": ctx.evaluate(out), "metrics": ctx.metrics}
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
