"""Running the variants of a comparison: in this process, or in parallel spawned processes.

A job carries plain data (the variant's recipe document, the registry, the shared baseline
row) so it crosses to a spawned process; the outcome comes back as a report or an error
message, never as an exception object (torchslim's errors take constructor arguments that
pickling does not keep). A validated recipe cannot cross (its class is built at run time, so
pickle cannot find it by name): a job run in this process uses the recipe validated here, and a
spawned process validates the job's document, once.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import sys
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..engine.errors import TorchslimError
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.report import Report, Row
from ..engine.runner import run
from ..engine.yamlio import Document


@dataclass(frozen=True)
class Job:
    """One variant to run."""

    name: str
    document: Document
    registry: Registry
    out: Path | None
    """The variant's report directory (None: nothing written)."""
    baseline: Row
    threads: int | None
    """Torch threads of the process (parallel jobs), or None to leave them."""
    resume: bool
    """Continue from the stage checkpoints an interrupted run left in ``out``."""
    recipe: RecipeBase | None = None
    """``document`` validated in this process (None: :func:`execute` validates it)."""


@dataclass(frozen=True)
class Outcome:
    """What running a job gave: its report, or why it failed."""

    report: Report | None
    error: str | None = None
    exit_code: int = 0


def execute(job: Job, log: logging.Logger) -> Outcome:
    """Run one variant with the shared baseline; a torchslim error becomes a failed outcome."""
    try:
        recipe = job.recipe if job.recipe is not None else validate(job.document, job.registry)
        report = run(recipe, job.out, registry=job.registry, overwrite=True, resume=job.resume, log=log, baseline=job.baseline)
    except TorchslimError as exc:
        log.warning("compare: %s failed: %s", job.name, exc)
        where = f" (traceback in {exc.log_path})" if exc.log_path is not None else ""
        return Outcome(None, f"{exc}{where}", exc.exit_code)
    return Outcome(report)


def run_parallel(jobs: list[Job], workers: int, log: logging.Logger) -> list[Outcome]:
    """Run ``jobs`` in up to ``workers`` spawned processes; outcomes in the order of ``jobs``."""
    if not jobs:
        return []
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-flight
    level = log.getEffectiveLevel()
    outcomes: dict[int, Outcome] = {}
    executor = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
    try:
        futures: dict[Future[Outcome], int] = {executor.submit(worker, _portable(job), level): i for i, job in enumerate(jobs)}
        log.info("compare: running %d variant(s) in %d parallel job(s)", len(jobs), min(workers, len(jobs)))
        for future in as_completed(futures):
            index = futures[future]
            outcomes[index] = future.result()
            log.info("compare: %s: %s", jobs[index].name, "done" if outcomes[index].report else "failed")
    except BaseException:  # Ctrl-C included: do not start the variants still queued
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()
    return [outcomes[i] for i in range(len(jobs))]


def _portable(job: Job) -> Job:
    """``job`` without its validated recipe, which pickle cannot send to another process."""
    return dataclasses.replace(job, recipe=None)


def worker(job: Job, level: int) -> Outcome:
    """Entry point of a spawned process or a Ray task: its own thread budget, its progress lines prefixed with the variant."""
    import torch

    if job.threads is not None:
        torch.set_num_threads(job.threads)
    log = logging.getLogger("torchslim")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"torchslim: {job.name}: %(message)s"))
        log.addHandler(handler)
    log.propagate = False  # as in the CLI: a library's root handler must not repeat the lines
    log.setLevel(level)
    return execute(job, log)
