"""Where the variants of a comparison (and the trials of a search) run: ``local`` processes, or tasks of a Ray
cluster (``ray`` or ``ray:ADDRESS``). Two interfaces: :meth:`Executor.run`, jobs in and outcomes out in their order
(a comparison), and :meth:`Executor.pool`, jobs started one at a time and collected as each ends (a search starts a
trial whenever a slot frees).

Ray (``pip install 'torchslim[ray]'``) is imported by this module alone, when a Ray executor is made. Each job is
one Ray task that asks for its recipe's threads as CPUs (and a GPU when the recipe's device is cuda); Ray places
the tasks and retries one whose worker or node was lost. A task runs into a folder of its own worker and sends
the folder's files back, written here into the job's ``out``: the cluster's nodes need no shared file system.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import sys
import tempfile
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ..engine.errors import UsageError
from .jobs import Job, Outcome, execute, portable, worker

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

    @property
    def one_by_one(self) -> bool:
        """The jobs run here one after another, in this process."""
        return self.workers == 1

    def describe(self) -> str:
        """The executor in words, for the mode line of a comparison."""
        return "local"

    def run(self, jobs: list[Job], log: logging.Logger) -> list[Outcome]:
        """Run ``jobs``; their outcomes, in the order of ``jobs``."""
        if self.one_by_one:
            outcomes = []
            for index, job in enumerate(jobs):
                if self.announce:
                    log.info("compare: [%d/%d] %s: running", index + 1, len(jobs), job.name)
                outcomes.append(execute(job, log))
            return outcomes
        if not jobs:
            return []
        with self.pool(log, len(jobs)) as pool:
            tokens = {pool.submit(job): index for index, job in enumerate(jobs)}
            log.info("compare: %s", pool.describe(len(jobs)))
            outcomes_at: dict[int, Outcome] = {}
            while len(outcomes_at) < len(jobs):
                token, outcome = pool.wait()
                index = tokens[token]
                outcomes_at[index] = outcome
                log.info("compare: %s: %s", jobs[index].name, "done" if outcome.report else "failed")
        return [outcomes_at[i] for i in range(len(jobs))]

    def pool(self, log: logging.Logger, size: int | None = None) -> Pool:
        """Jobs run as they are submitted, at most ``size`` (default: the workers) at once."""
        workers = min(self.workers, size or self.workers)
        return _Processes(workers, log) if workers > 1 else _Inline(log)


class Pool:
    """Jobs submitted one at a time and collected as each ends; a context manager that, left by an error (Ctrl-C
    included), starts none of the jobs still queued."""

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, job: Job) -> int:
        """Start ``job`` (or queue it); its token."""
        self.submitted += 1
        self._start(self.submitted, job)
        return self.submitted

    def wait(self) -> tuple[int, Outcome]:
        """The next job to end: its token and outcome (a job must be running)."""
        raise NotImplementedError

    def describe(self, count: int) -> str:
        """A line on ``count`` jobs started."""
        return f"running {count} job(s) one after another"

    def close(self, cancel: bool) -> None:
        """Release the workers; with ``cancel``, drop the jobs not started."""

    def _start(self, token: int, job: Job) -> None:
        raise NotImplementedError

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close(cancel=kind is not None)


class _Inline(Pool):
    """One job at a time, in this process, each run when it is waited for."""

    def __init__(self, log: logging.Logger) -> None:
        super().__init__()
        self.log = log
        self.queue: deque[tuple[int, Job]] = deque()

    def _start(self, token: int, job: Job) -> None:
        self.queue.append((token, job))

    def wait(self) -> tuple[int, Outcome]:
        token, job = self.queue.popleft()
        return token, execute(job, self.log)


class _Processes(Pool):
    """Up to ``workers`` jobs at once, each in a spawned process of its own thread budget."""

    def __init__(self, workers: int, log: logging.Logger) -> None:
        super().__init__()
        context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-flight
        self.workers, self.level = workers, log.getEffectiveLevel()
        # a fresh process for each job (Python 3.11+), as a job's leftovers (its runtime's compiled models, memory,
        # thread pools) would disturb the next one's timing
        if sys.version_info >= (3, 11):
            self.processes = ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1)
        else:
            self.processes = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        self.running: dict[Future[Outcome], int] = {}

    def _start(self, token: int, job: Job) -> None:
        self.running[self.processes.submit(worker, portable(job), self.level)] = token

    def wait(self) -> tuple[int, Outcome]:
        done, _ = wait(self.running, return_when=FIRST_COMPLETED)
        future = min(done, key=self.running.__getitem__)  # the first submitted, when several ended together
        return self.running.pop(future), future.result()

    def describe(self, count: int) -> str:
        return f"running {count} variant(s) in {min(self.workers, count)} parallel job(s)"

    def close(self, cancel: bool) -> None:
        self.processes.shutdown(wait=not cancel, cancel_futures=cancel)


@dataclass(frozen=True)
class RayExecutor(Executor):
    """Runs each job as a task of the Ray cluster at ``address`` (None: a cluster started on this machine)."""

    address: str | None = None

    @property
    def divides_cores(self) -> bool:
        return False  # Ray gives each task the CPUs it asks for

    @property
    def one_by_one(self) -> bool:
        return False

    def describe(self) -> str:
        return f"Ray tasks on {self.address or 'a local Ray cluster'} (each asks for its recipe's threads as CPUs)"

    def pool(self, log: logging.Logger, size: int | None = None) -> Pool:
        return _RayTasks(self._joined(log), log)

    def _joined(self, log: logging.Logger) -> Any:
        """Ray, joined to the cluster (started here when no address is given)."""
        ray = ray_module()
        if not ray.is_initialized():
            if self.address is None:  # a cluster started here: its workers as nice as this command (Ray's default: 15)
                os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
            try:
                ray.init(address=self.address, log_to_driver=log.isEnabledFor(logging.INFO), configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there, or another Ray version
                raise UsageError(f"--executor ray:{self.address}: cannot join the Ray cluster: {exc}") from None
        return ray


class _RayTasks(Pool):
    """Each job a Ray task, placed by the cluster; as many at once as it has room for."""

    def __init__(self, ray: Any, log: logging.Logger) -> None:
        super().__init__()
        self.ray, self.level = ray, log.getEffectiveLevel()
        self.task = ray.remote(_remote)
        self.running: dict[Any, tuple[int, Job]] = {}

    def _start(self, token: int, job: Job) -> None:
        options = {"name": job.name, "max_retries": RETRIES, **resources(job)}
        self.running[self.task.options(**options).remote(_task_job(job), self.level, _pack(job))] = (token, job)

    def wait(self) -> tuple[int, Outcome]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        token, job = self.running.pop(ready[0])
        return token, _collect(self.ray, ready[0], job)

    def describe(self, count: int) -> str:
        return f"{count} job(s) submitted to Ray (the cluster has {self.ray.cluster_resources().get('CPU', 0):g} CPU(s))"

    def close(self, cancel: bool) -> None:
        if cancel:  # the tasks still running would go on using the cluster for nothing
            for ref in self.running:
                self.ray.cancel(ref)


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


def _task_job(job: Job) -> Job:
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
