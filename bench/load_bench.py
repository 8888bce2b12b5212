"""The bits study on an idle and on a busy machine, per thread remedy: ``python bench/load_bench.py [--quick]``.

Runs ``torchslim compare recipes/compare/bits-*.yaml --out DIR`` (``--quick``: the two float8 recipes,
4 variants) in a fresh output directory, once on the machine as it is ("idle") and once under a simulated
load of one busy process per usable core (``python -c "while True: pass"``, started before the run and
killed after it), back to back, for each remedy:

- ``torch-default``: work outside timing on as many torch threads as usable cores (torch's default,
  and what every run did before recipes had ``threads``): the recipes' ``threads`` set to the core count;
- ``passive``: the same, with ``OMP_WAIT_POLICY=PASSIVE`` in the environment (libgomp's waiting
  threads sleep at once instead of spinning first);
- ``one-thread``: the recipes' ``threads`` set to 1 (what "one thread per process when the machine
  is busy" would choose);
- ``recipe``: the recipes as committed (``threads`` left null: as their ``metrics.threads``, 1).

``--remedies`` picks some. Each run is stopped at ``--timeout`` seconds and then counts as not finished,
with the variants it had done. The machine is shared: ``/proc/loadavg`` is recorded before and after
every run, and the median number of runnable tasks while it ran (the kernel's count, the simulated load
and the run's own threads included), with the run's CPU seconds (the same work costs the same CPU time
unless threads spin while they wait). Writes ``bench/results/load_bench.json`` (``--quick``:
``bench/results/quick/load_bench.json``). See docs/compare.md, "On a shared machine".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes" / "compare").glob("bits-*.yaml"))
QUICK_RECIPES = sorted((ROOT / "recipes" / "compare").glob("bits-float8*.yaml"))
#: Environment variables that change torch's threading: cleared for every run, then set per remedy.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
#: remedy -> (environment, top-level recipe fields written over the committed recipes).
REMEDIES: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "torch-default": ({}, {"threads": len(os.sched_getaffinity(0))}),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, {"threads": len(os.sched_getaffinity(0))}),
    "one-thread": ({}, {"threads": 1}),
    "recipe": ({}, {}),
}


def loadavg() -> str:
    """The first four fields of /proc/loadavg: 1, 5 and 15-minute load, runnable/all tasks."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:4])


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


@contextmanager
def busy_load(processes: int) -> Iterator[None]:
    """``processes`` busy Python loops while the block runs; each is ended by its own handle after it."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(1.0)  # the loops running before the measured command starts
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


class RunnableSampler:
    """The kernel's count of runnable tasks (/proc/loadavg, 4th field), sampled twice a second in a thread."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append(int(loadavg().split()[3].split("/")[0]))

    def __enter__(self) -> RunnableSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children: the busy loops are waited for
    only after the measured command, so a difference around it is that command's CPU time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def recipe_copies(recipes: list[Path], fields: dict[str, Any], folder: Path) -> list[Path]:
    """The recipes as committed (no fields), or copies in ``folder`` with ``fields`` set at the top level."""
    if not fields:
        return recipes
    copies = []
    for recipe in recipes:
        data = yaml.safe_load(recipe.read_text())
        data.update(fields)
        copy = folder / recipe.name
        copy.write_text(yaml.safe_dump(data, sort_keys=False))
        copies.append(copy)
    return copies


def run_study(remedy: str, loaded: bool, recipes: list[Path], timeout: float) -> dict[str, Any]:
    """One timed ``torchslim compare`` of ``recipes`` under ``remedy``, on the machine as it is or under load."""
    variables, fields = REMEDIES[remedy]
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(variables, PYTHONPATH=str(ROOT), TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD="1")
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        sources = recipe_copies(recipes, fields, Path(tmp))
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "torchslim", "compare", *map(str, sources), "--out", str(out), "-q"]
        with busy_load(usable_cores() if loaded else 0):
            before = loadavg()
            with RunnableSampler() as sampler:
                start, children = time.perf_counter(), _children_cpu()
                try:
                    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
                    finished, code, tail = True, done.returncode, done.stderr[-2000:]
                except subprocess.TimeoutExpired:
                    finished, code, tail = False, None, ""
                seconds, cpu = time.perf_counter() - start, _children_cpu() - children
            after = loadavg()
        variants = sum(1 for _ in out.glob("*/report.json")) if out.exists() else 0
        shutil.rmtree(out, ignore_errors=True)
    runnable = statistics.median(sampler.samples) if sampler.samples else None
    return {
        "remedy": remedy,
        "loaded": loaded,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "finished": finished,
        "exit_code": code,
        "variants_done": variants,
        "loadavg_before": before,
        "loadavg_after": after,
        "runnable_median": runnable,
        "stderr_tail": tail if code else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the two float8 recipes (4 variants) instead of all bits-*")
    parser.add_argument("--remedies", default=",".join(REMEDIES), help=f"comma-separated, of {', '.join(REMEDIES)}")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (idle, loaded) per remedy, interleaved")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds after which a run is stopped")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    args = parser.parse_args()
    remedies = [r.strip() for r in args.remedies.split(",") if r.strip()]
    unknown = [r for r in remedies if r not in REMEDIES]
    if unknown:
        parser.error(f"unknown remedies {unknown}; known: {', '.join(REMEDIES)}")
    recipes = QUICK_RECIPES if args.quick else RECIPES
    runs = []
    for round_ in range(args.rounds):
        for remedy in remedies:
            # Idle and loaded back to back, their order alternating by round: both see the same background.
            for loaded in (False, True) if round_ % 2 == 0 else (True, False):
                result = run_study(remedy, loaded, recipes, args.timeout)
                runs.append(result)
                state = "done" if result["finished"] else f"stopped ({result['variants_done']} variants done)"
                print(
                    f"{remedy:14s} {'loaded' if loaded else 'idle':6s} {result['seconds']:7.1f} s "
                    f"(cpu {result['cpu_seconds']:.1f} s) {state}  "
                    f"loadavg {result['loadavg_before']} -> {result['loadavg_after']}  "
                    f"runnable median {result['runnable_median']}",
                    flush=True,
                )
    out = args.out or ROOT / "bench" / "results" / ("quick" if args.quick else "") / "load_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "mode": "quick" if args.quick else "full",
        "cores": usable_cores(),
        "timeout": args.timeout,
        "recipes": [p.name for p in recipes],
        "runs": runs,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
