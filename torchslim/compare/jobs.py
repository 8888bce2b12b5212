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
import sys
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


def portable(job: Job) -> Job:
    """``job`` without its validated recipe, which pickle cannot send to another process."""
    return dataclasses.replace(job, recipe=None)


#: The name of the log handler a worker process prints with.
_HANDLER = "torchslim-job"


def worker(job: Job, level: int) -> Outcome:
    """Entry point of a spawned process or a Ray task: its own thread budget, its progress lines prefixed with the variant."""
    import torch

    if job.threads is not None:
        torch.set_num_threads(job.threads)
    log = logging.getLogger("torchslim")
    handler = next((h for h in log.handlers if h.get_name() == _HANDLER), None)
    if handler is None:  # a process (a Ray worker, a pool's) may run several jobs: one handler, named for the job
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER)
        log.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"torchslim: {job.name}: %(message)s"))
    log.propagate = False  # as in the CLI: a library's root handler must not repeat the lines
    log.setLevel(level)
    return execute(job, log)
