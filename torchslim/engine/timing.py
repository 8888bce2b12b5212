"""Latency you can believe: timed forward passes with their spread, and how busy the machine was meanwhile.

A median alone hides whether it means anything: on a machine where other processes want the
same cores, a forward pass of 0.1 ms is sometimes preempted for a whole scheduler slice (several
ms), and a ratio of two such medians is noise that looks like data. So every timing keeps its
samples' quartiles and counts the other runnable tasks between its runs (Linux: /proc), and
:mod:`torchslim.engine.noise` decides from these whether a figure is noisy.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .hooks import settle_seconds

LATENCY_BATCH = 32
"""Batch size latency is measured at unless a recipe says otherwise (``metrics.batch_size``)."""
LATENCY_THREADS = 2
"""torch threads latency is measured with unless a recipe says otherwise (``metrics.threads``): fixed,
so that figures compare between machines with other core counts."""


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated forward passes, in milliseconds, and the machine's load meanwhile."""

    samples: tuple[float, ...]
    others_running: float | None = None
    """Median number of runnable tasks of other processes seen between the timed runs (None off Linux)."""

    @property
    def median(self) -> float:
        """The median time, in milliseconds."""
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        """Interquartile range (75th minus 25th percentile), in milliseconds."""
        return _iqr(self.samples)


@dataclass(frozen=True)
class Speedup:
    """baseline / final from paired rounds timed interleaved: the median ratio and its quartiles."""

    ratio: float
    q1: float
    q3: float
    baseline: Timing
    final: Timing

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain data for report.json."""
        others = [t.others_running for t in (self.baseline, self.final) if t.others_running is not None]
        return {
            "ratio": self.ratio,
            "q1": self.q1,
            "q3": self.q3,
            "rounds": len(self.baseline.samples),
            "baseline_ms": self.baseline.median,
            "final_ms": self.final.median,
            "baseline_iqr_ms": self.baseline.iqr,
            "final_iqr_ms": self.final.iqr,
            "others_running": max(others) if others else None,
        }


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, restoring the previous setting after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_forward(model: nn.Module, example: torch.Tensor, *, warmup: int, runs: int, threads: int | None) -> Timing:
    """Time ``runs`` forward passes of ``model`` on ``example`` after ``warmup`` untimed ones."""
    return interleaved([model], example, warmup=warmup, runs=runs, threads=threads)[0]


def interleaved(
    models: Sequence[nn.Module], example: torch.Tensor, *, warmup: int, runs: int, threads: int | None
) -> list[Timing]:
    """Time each model ``runs`` times, taking turns round by round (the order reversed every other
    round), so that a change in the machine's load affects every model alike. Each timed run follows an
    untimed one of the same model, and a runtime that keeps a core busy after it returns is waited out
    (``settle_seconds``): no model is charged for the one before it."""
    inputs = [example.to(_device(model)) for model in models]
    with torch_threads(threads), torch.inference_mode():
        for model, batch in zip(models, inputs, strict=True):
            for _ in range(warmup):
                model(batch)
        return in_turns([partial(_time_once, model, batch) for model, batch in zip(models, inputs, strict=True)], runs)


def in_turns(calls: Sequence[Callable[[], float]], runs: int) -> list[Timing]:
    """``runs`` rounds in which each call (returning the milliseconds it measured) takes its turn, the
    order reversed every other round, with the other runnable tasks counted after each round."""
    samples: list[list[float]] = [[] for _ in calls]
    others: list[int] = []
    for round_ in range(runs):
        order = range(len(calls)) if round_ % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            samples[i].append(calls[i]())
        seen = others_running()
        if seen is not None:
            others.append(seen)
    busy = statistics.median(others) if others else None
    return [Timing(tuple(s), busy) for s in samples]


def speedup(
    baseline: nn.Module, final: nn.Module, example: torch.Tensor, *, warmup: int, runs: int, threads: int | None
) -> Speedup:
    """baseline / final latency, from ``runs`` rounds timed interleaved (one ratio per round)."""
    base, last = interleaved([baseline, final], example, warmup=warmup, runs=runs, threads=threads)
    ratios = [b / f for b, f in zip(base.samples, last.samples, strict=True) if f > 0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return Speedup(median, q1, q3, base, last)


def _time_once(model: nn.Module, batch: torch.Tensor) -> float:
    # CUDA kernels run asynchronously: wait for them, or the clock measures only the launch.
    sync: Callable[[], None] = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    # One untimed run first: the timed one then starts warm (caches, a core not idle), whatever model ran
    # before it in the round (measured: after a pause or another model, a 0.7 ms CNN in OpenVINO took 1.2 ms).
    model(batch)
    sync()
    start = time.perf_counter()
    model(batch)
    sync()
    elapsed = (time.perf_counter() - start) * 1000.0
    # A runtime whose idle threads keep spinning after a run (ONNX Runtime's) would slow whatever is timed
    # next: wait for them, untimed (RuntimeModel.settle_seconds).
    time.sleep(settle_seconds(model))
    return elapsed


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def others_running() -> int | None:
    """Runnable tasks of other processes right now: the kernel's count (/proc/loadavg) minus this
    process's own running threads (torch's worker threads spin a while after each call). None off Linux."""
    try:
        # Own threads counted before and after the kernel's total, the larger count taken: a worker
        # thread that stops spinning in between must not be counted as another process's task.
        before = _own_running()
        with open("/proc/loadavg", encoding="ascii") as file:
            total = int(file.read().split()[3].split("/")[0])
        own = max(before, _own_running())
    except (OSError, ValueError, IndexError):
        return None
    return max(0, total - own)


def _own_running() -> int:
    return sum(_running(tid) for tid in os.listdir("/proc/self/task"))


def _running(tid: str) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/stat", encoding="ascii", errors="replace") as file:
            stat = file.read()
    except OSError:  # the thread ended meanwhile
        return False
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "R"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it, else the machine's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo's ``model name``; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None
