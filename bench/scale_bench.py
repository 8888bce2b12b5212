"""docs/scale.md's figures: the same 8 trials of recipes/search-digits.yaml run three ways on this machine, and the
per-trial overhead of a Ray task.

    python -m bench.scale_bench OUT_DIR [HIDDEN EPOCHS]

(HIDDEN, EPOCHS: the MLP's width and training epochs, for longer trials; default the recipe's 256 and 15.)

1. one search process, trials one at a time, 2 torch threads each (``--jobs 1``, ``threads: 2``);
2. two local worker processes, 1 thread each (``--jobs 2``);
3. a local Ray cluster with two workers, 1 CPU (thread) each (``--executor ray --jobs 2``), its workers at the
   command's niceness (torchslim's default), then at Ray's own default, nice 15.

The sampler is random, so every run tries the same 8 values in the same order (a trial's values depend on its
number alone). Prints a Markdown table with the load average before and after each run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TRIALS = 8
RAY = ["--jobs", "2", "--executor", "ray"]
#: name: (torch threads per trial, flags, environment). Ray starts its workers at nice 15 unless told otherwise;
#: the cluster torchslim starts (--executor ray) runs them at the command's own niceness.
RUNS: dict[str, tuple[int, list[str], dict[str, str]]] = {
    "1 worker x 2 threads": (2, ["--jobs", "1"], {}),
    "2 local workers x 1 thread": (1, ["--jobs", "2"], {}),
    "Ray, 2 workers x 1 thread, at the command's niceness (torchslim's default)": (1, RAY, {}),
    "Ray, 2 workers x 1 thread, at Ray's default nice 15": (1, RAY, {"RAY_worker_niceness": "15"}),
}


def recipe(out: Path, threads: int, model: dict[str, int]) -> Path:
    """recipes/search-digits.yaml with 8 trials sampled at random, ``threads`` torch threads, ``model`` kwargs."""
    data = yaml.safe_load((ROOT / "recipes" / "search-digits.yaml").read_text())
    data["model"]["kwargs"].update(model)
    data["threads"] = threads
    data["metrics"]["threads"] = threads
    data["search"].update(trials=TRIALS, sampler="random")
    data["search"].pop("minutes", None)
    path = out / f"search-{threads}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(name: str, path: Path, flags: list[str], env: dict[str, str], out: Path) -> dict[str, object]:
    """One search from the command line: its wall time, per-trial seconds, values and load."""
    before, start = load(), time.perf_counter()
    folder = out / re.sub(r"\W+", "-", name)
    done = subprocess.run(
        [sys.executable, "-m", "torchslim", "search", str(path), "--out", str(folder), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    trials = json.loads((folder / "front.json").read_text())["trials"]
    return {
        "name": name,
        "wall_s": wall,
        "trials_per_hour": 3600 * len(trials) / wall,
        "load_before": before,
        "load_after": load(),
        "trial_s": [t["seconds"] for t in trials],
        "values": [t["values"] for t in trials],
        "accuracy": [t["final"].get("accuracy") for t in trials],
        "errors": [t.get("error") for t in trials],
    }


def ray_overhead() -> dict[str, float]:
    """A Ray task's round trip on this machine: the first (a worker started), then warm ones; and a trial folder's
    files shipped back (the size of a digits trial: about 1 MB)."""
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, log_to_driver=False)
    started = time.perf_counter() - start

    @ray.remote(num_cpus=1)
    def echo(data: bytes) -> bytes:
        return data

    first = time.perf_counter()
    ray.get(echo.remote(b""))
    cold = time.perf_counter() - first
    warm = []
    for _ in range(50):
        t = time.perf_counter()
        ray.get(echo.remote(b""))
        warm.append(time.perf_counter() - t)
    payload = os.urandom(1 << 20)
    t = time.perf_counter()
    for _ in range(10):
        ray.get(echo.remote(payload))
    shipped = (time.perf_counter() - t) / 10
    ray.shutdown()
    return {
        "cluster_start_s": started,
        "first_task_s": cold,
        "warm_task_ms": 1000 * sorted(warm)[len(warm) // 2],
        "one_mb_round_trip_ms": 1000 * shipped,
    }


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    model = {"hidden": int(sys.argv[2]), "train_epochs": int(sys.argv[3])} if len(sys.argv) > 3 else {}
    results = [timed(name, recipe(out, threads, model), flags, env, out) for name, (threads, flags, env) in RUNS.items()]
    overhead = ray_overhead()
    (out / "scale.json").write_text(json.dumps({"runs": results, "ray": overhead}, indent=2))
    print("| run | wall s | trials per hour | mean trial s | load before -> after |\n|---|---|---|---|---|")
    for r in results:
        seconds = r["trial_s"]
        assert isinstance(seconds, list)
        print(
            f"| {r['name']} | {r['wall_s']:.0f} | {r['trials_per_hour']:.0f} | {sum(seconds) / len(seconds):.1f} | "
            f"{r['load_before']} -> {r['load_after']} |"
        )
    print(json.dumps(overhead, indent=2))
    same = all(r["values"] == results[0]["values"] for r in results)
    print(f"same 8 values in every run: {same}; accuracies: {[r['accuracy'] for r in results]}")


if __name__ == "__main__":
    main()
