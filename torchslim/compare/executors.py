"""Where the variants of a comparison (and the trials of a search) run: ``local`` processes, or tasks of a Ray
cluster (``ray`` or ``ray:ADDRESS``). One interface, :meth:`Executor.run`: jobs in, outcomes out in their order.

Ray (``pip install 'torchslim[ray]'``) is imported by this module alone, when a Ray executor is made. Each job is
one Ray task that asks for its recipe's threads as CPUs (and a GPU when the recipe's device is cuda); Ray places
the tasks and retries one whose worker or node was lost. A task runs into a folder of its own worker and sends
the folder's files back, written here into the job's ``out``: the cluster's nodes need no shared file system.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.errors import UsageError
from .jobs import Job, Outcome, execute, run_parallel, worker

#: How often Ray runs a task again after its worker process or node died (a stage's own error is not retried).
RETRIES = 2
_RAY_MISSING = "--executor ray needs Ray: pip install 'torchslim[ray]'"


@dataclass(frozen=True)
class Executor:
    """Runs jobs here: one after another, or in ``workers`` spawned processes that divide this machine's cores."""

    workers: int = 1
    announce: bool = True
    """Log a line as each job starts when they run one after another (a search logs its own)."""

    @property
    def divides_cores(self) -> bool:
        """The jobs share this machine's cores (a recipe's threads are capped at its share)."""
        return self.workers > 1

    def describe(self) -> str:
        """The executor in words, for the mode line of a comparison."""
        return "local"

    def run(self, jobs: list[Job], log: logging.Logger) -> list[Outcome]:
        """Run ``jobs``; their outcomes, in the order of ``jobs``."""
        if self.workers > 1:
            return run_parallel(jobs, self.workers, log)
        outcomes = []
        for index, job in enumerate(jobs):
            if self.announce:
                log.info("compare: [%d/%d] %s: running", index + 1, len(jobs), job.name)
            outcomes.append(execute(job, log))
        return outcomes


@dataclass(frozen=True)
class RayExecutor(Executor):
    """Runs each job as a task of the Ray cluster at ``address`` (None: a cluster started on this machine)."""

    address: str | None = None

    @property
    def divides_cores(self) -> bool:
        return False  # Ray gives each task the CPUs it asks for

    def describe(self) -> str:
        return f"Ray tasks on {self.address or 'a local Ray cluster'} (each asks for its recipe's threads as CPUs)"

    def run(self, jobs: list[Job], log: logging.Logger) -> list[Outcome]:
        if not jobs:
            return []
        ray = ray_module()
        if not ray.is_initialized():
            if self.address is None:  # a cluster started here: its workers as nice as this command (Ray's default: 15)
                os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
            try:
                ray.init(address=self.address, log_to_driver=log.isEnabledFor(logging.INFO), configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there, or another Ray version
                raise UsageError(f"--executor ray:{self.address}: cannot join the Ray cluster: {exc}") from None
        task = ray.remote(_remote)
        level = log.getEffectiveLevel()
        refs = [
            task.options(name=job.name, max_retries=RETRIES, **resources(job)).remote(_portable(job), level, _pack(job))
            for job in jobs
        ]
        log.info(
            "compare: %d job(s) submitted to Ray (the cluster has %g CPU(s))", len(jobs), ray.cluster_resources().get("CPU", 0)
        )
        outcomes: dict[Any, Outcome] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            index = refs.index(ready[0])
            outcomes[index] = _collect(ray, ready[0], jobs[index])
            log.info("compare: %s: %s", jobs[index].name, "done" if outcomes[index].report else "failed")
        return [outcomes[i] for i in range(len(jobs))]


def make_executor(spec: str, workers: int = 1, announce: bool = True) -> Executor:
    """``local`` or ``ray[:ADDRESS]`` (``--executor``) as an executor; UsageError for anything else."""
    kind, _, address = spec.partition(":")
    if kind == "local" and not address:
        return Executor(workers, announce)
    if kind == "ray":
        ray_module()  # the missing extra is named before anything runs
        return RayExecutor(workers, announce, address or None)
    raise UsageError(f"--executor {spec}: expected local, ray or ray:ADDRESS (e.g. ray:auto, ray:10.0.0.5:6379)")


def ray_module() -> Any:
    """Ray, or UsageError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UsageError(_RAY_MISSING) from None
    return ray


def resources(job: Job) -> dict[str, float]:
    """What a job's task asks the cluster for: its recipe's threads as CPUs, and a GPU when it runs on cuda."""
    recipe = job.recipe
    threads = job.threads or (recipe.work_threads() if recipe is not None else 1)
    gpus = 1 if recipe is not None and recipe.device.startswith("cuda") else 0
    return {"num_cpus": threads, "num_gpus": gpus}


def _portable(job: Job) -> Job:
    """The job as a task carries it: no validated recipe (pickle cannot send its class), the threads it asked for."""
    threads = resources(job)["num_cpus"]
    return dataclasses.replace(job, recipe=None, threads=int(threads))


def _remote(job: Job, level: int, files: dict[str, bytes] | None) -> tuple[Outcome, dict[str, bytes], str | None]:
    """The task: the job run into a folder of this worker; its outcome, the folder's files, and the folder's name
    (for the paths in an error message)."""
    if job.out is None:
        return worker(job, level), {}, None
    with tempfile.TemporaryDirectory(prefix="torchslim-ray-") as scratch:
        folder = Path(scratch) / job.out.name
        _unpack(files, folder)
        outcome = worker(dataclasses.replace(job, out=folder), level)
        return outcome, _pack_folder(folder), str(folder)


def _collect(ray: Any, ref: Any, job: Job) -> Outcome:
    """A finished task's outcome, its files written into the job's ``out``; a task Ray gave up on is a failure."""
    errors = ray.exceptions
    try:
        outcome, files, folder = ray.get(ref)
    except errors.RayTaskError as exc:  # not a torchslim error: the task's own traceback, in Ray's words
        return Outcome(None, f"its Ray task raised {exc}", 1)
    except (
        errors.WorkerCrashedError,
        errors.NodeDiedError,
        errors.ObjectLostError,
        errors.TaskCancelledError,
        errors.OutOfMemoryError,
    ) as exc:
        return Outcome(
            None, f"its Ray worker was lost {RETRIES + 1} time(s) ({type(exc).__name__}): {str(exc).splitlines()[0]}", 1
        )
    if job.out is not None:
        _unpack(files, job.out)
    if outcome.error is not None and folder is not None and job.out is not None:
        outcome = dataclasses.replace(outcome, error=outcome.error.replace(folder, str(job.out)))
    return outcome  # type: ignore[no-any-return]


def _pack(job: Job) -> dict[str, bytes] | None:
    """What a resumed job continues from (its checkpoints), to send with the task; None for a fresh one."""
    return _pack_folder(job.out) if job.resume and job.out is not None else None


def _pack_folder(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _unpack(files: dict[str, bytes] | None, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
