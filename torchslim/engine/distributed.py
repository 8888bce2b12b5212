"""Running under ``torchrun``: which process this is, and the life of the process group.

``torchrun --nproc_per_node N -m torchslim run RECIPE`` starts N copies of the command with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment. Every copy runs the recipe;
training stages share the work through torch.distributed (gloo on CPU, nccl on GPU), and only
the main process (rank 0) logs, measures, writes reports and saves.

Outside torchrun (no ``WORLD_SIZE``, or 1) every helper here is a cheap no-op: one process is
the main one.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def launched() -> bool:
    """Whether this process was started by torchrun (or similar) as one of several."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether a process group is initialized (by :func:`init`, or by the caller)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes training together (1 outside torchrun)."""
    return dist.get_world_size() if active() else _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's index among them, 0 for the main process."""
    return dist.get_rank() if active() else _env_int("RANK", 0)


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses is ``cuda:<local_rank>``."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Whether this is the process that logs, measures and writes (rank 0)."""
    return rank() == 0


def backend(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_for(name: str) -> torch.device:
    """The device a recipe's ``device`` names, for this process: ``cuda`` becomes ``cuda:<local_rank>``."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", local_rank())
    return device


def init(device: torch.device | None = None) -> bool:
    """Join the process group torchrun set up; True if this call created it.

    Does nothing (False) outside torchrun or when a group already exists.
    """
    if not launched() or active():
        return False
    if not dist.is_available():
        raise RuntimeError("launched by torchrun (WORLD_SIZE > 1) but this torch build has no torch.distributed")
    target = device or torch.device("cpu")
    if target.type == "cuda":
        torch.cuda.set_device(device_for("cuda"))
    dist.init_process_group(backend(target))
    return True


def init_for_stage(device: torch.device) -> None:
    """:func:`init` for a stage that needs the group before the runner created one.

    The group is then destroyed when the process exits, since no caller owns it.
    """
    if init(device):
        atexit.register(destroy)


def destroy() -> None:
    """Leave the process group, if one is initialized."""
    if active():
        dist.destroy_process_group()


@contextmanager
def session(device: torch.device | None = None) -> Iterator[None]:
    """Hold a process group for the block when under torchrun; destroy it after if this created it."""
    created = init(device)
    try:
        yield
    finally:
        if created:
            destroy()


def barrier() -> None:
    """Wait until every process reaches this point (nothing to wait for in one process)."""
    if active() and world_size() > 1:
        dist.barrier()


def broadcast_float(value: float, device: torch.device, src: int = 0) -> float:
    """Rank ``src``'s ``value`` on every process (e.g. an eval score computed only on rank 0)."""
    if not active() or world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src)
    return float(tensor.item())


def mean_float(value: float, device: torch.device) -> float:
    """The mean of ``value`` over every process."""
    if not active() or world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def sync_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every process.

    DistributedDataParallel broadcasts buffers before each forward pass, so after the last
    step each process holds the statistics of its own last batch; this makes them agree.
    """
    if not active() or world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)
