"""Outgrowing one machine (docs/scale.md): executors, a study shared through a database, MLflow tracking.

Fast: the options parsed and refused, the extras named when missing, the resources a Ray task asks for, and the
trial numbers of searches sharing one storage (no trial is run). Slow: a real Ray cluster of two nodes running a
compare and a search (a worker killed mid-trial), two search processes sharing one SQLite study, MLflow's runs read
back with MLflow's own client.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, digits_recipe, write_recipe
from tests.test_search import search_recipe
from torchslim import Registry
from torchslim.compare import compare
from torchslim.compare.executors import Executor, RayExecutor, make_executor, resources
from torchslim.compare.jobs import Job
from torchslim.engine.errors import UsageError
from torchslim.engine.recipe import validate
from torchslim.engine.report import Row
from torchslim.engine.study_fields import SearchSpec
from torchslim.engine.tracking import check_tracking
from torchslim.engine.yamlio import Document

pytestmark = pytest.mark.usefixtures("one_thread")
needs = {
    name: pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"pip install 'torchslim[{extra}]'")
    for name, extra in (("optuna", "search"), ("ray", "ray"), ("mlflow", "mlflow"))
}
ENV = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(ROOT)}
SPACE = {"stages.0.amount": {"low": 0.2, "high": 0.8}}


def test_executor_and_tracker_options_are_parsed_or_refused() -> None:
    assert make_executor("local") == Executor(1) and make_executor("local", 3).divides_cores
    for wrong in ("dask", "local:somewhere", ""):
        with pytest.raises(UsageError, match=r"--executor .*: expected local, ray or ray:ADDRESS"):
            make_executor(wrong)
    with pytest.raises(UsageError, match=r"--track wandb: expected mlflow or mlflow:URI"):
        check_tracking("wandb")


@needs["ray"]
def test_a_ray_executor_keeps_its_address_and_divides_no_cores() -> None:
    ray = make_executor("ray:10.0.0.5:6379", 4)
    assert isinstance(ray, RayExecutor) and ray.address == "10.0.0.5:6379" and not ray.divides_cores
    assert make_executor("ray").address is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("module", "option", "extra"), [("ray", "--executor ray", "ray"), ("mlflow", "--track mlflow", "mlflow")]
)
def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, module: str, option: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(UsageError, match=rf"{option} needs .*: pip install 'torchslim\[{extra}\]'"):
        make_executor("ray") if module == "ray" else check_tracking("mlflow")


def test_the_cli_refuses_an_unknown_executor_before_running(cli: Any, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, digits_recipe([{"type": "prune", "amount": 0.5}]))
    result = cli("compare", str(path), "--executor", "slurm")
    assert result.returncode == 2 and "--executor slurm: expected local, ray or ray:ADDRESS" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_ray_task_asks_for_the_recipes_threads_and_a_gpu_on_cuda(registry: Registry) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}])
    for device, threads, gpus in (("cpu", 3, 0), ("cuda", 2, 1), ("cuda:1", 1, 1)):
        document = Document({**recipe, "device": device, "threads": threads}, "<recipe>")
        job = Job("v", document, registry, None, Row("baseline", None, {}), None, False, validate(document, registry))
        assert resources(job) == {"num_cpus": threads, "num_gpus": gpus}


@needs["optuna"]
def test_searches_sharing_a_storage_never_share_a_trial_number(tmp_path: Path) -> None:
    """Two studies on one SQLite file ask in turn (as two processes would); a released trial's number comes back to
    the next ask, whoever asks; a running trial of a live process is not recovered by the other."""
    from torchslim.search.study import Study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = SearchSpec(space={"stages.0.amount": {"low": 0.1, "high": 0.9}}, trials=10)
    one = Study(tmp_path / "a", spec, "same recipe", resume=True, storage=url)
    two = Study(tmp_path / "b", spec, "same recipe", resume=True, storage=url)
    asked = [one.ask(), two.ask(), one.ask(), two.ask()]
    assert [number for _, number in asked] == [1, 2, 3, 4]
    assert one.next_number() == two.next_number() == 5
    one.release(asked[1][0].number, 2)  # as a recovered interrupted trial: its rerun keeps number 2
    assert two.next_number() == 2 and two.ask()[1] == 2 and one.ask()[1] == 5
    two.recover(__import__("logging").getLogger("test"))  # trials 1, 3, 4 belong to this live process: left running
    assert one.next_number() == 6


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A real Ray cluster on this machine: a head and a second node, one CPU each; its address."""
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes.address
    ray.shutdown()
    nodes.shutdown()


def _figures(front: Path) -> list[tuple[int, dict[str, Any], float, int]]:
    data = json.loads(front.read_text())
    return [(t["trial"], t["values"], t["final"]["accuracy"], t["final"]["size_bytes"]) for t in data["trials"]]


@needs["ray"]
@pytest.mark.slow  # a Ray cluster of two nodes, two comparisons
def test_a_compare_on_ray_gives_the_local_figures(cluster: str, tmp_path: Path, registry: Registry) -> None:
    recipe = digits_recipe([{"type": "prune", "name": "prune", "amount": 0.5}], train_epochs=3)
    recipe.update(threads=1, sweep={"stages.0.amount": [0.3, 0.6]})
    path = write_recipe(tmp_path, recipe)
    local = compare([path], tmp_path / "local", registry=registry)
    remote = compare([path], tmp_path / "ray", executor=f"ray:{cluster}", registry=registry)
    assert [e.error for e in remote.entries] == [None, None]
    for a, b in zip(local.entries, remote.entries, strict=True):
        assert (a.name, a.final["accuracy"], a.final["size_bytes"]) == (b.name, b.final["accuracy"], b.final["size_bytes"])
        assert (tmp_path / "ray" / b.folder / "report.json").is_file() and (tmp_path / "ray" / b.folder / "model.pt").is_file()
    assert "mode: Ray tasks on" in remote.text()


def _titles(prefix: str) -> set[int]:
    """The processes whose title (a Ray worker's is ``ray::TASK``) starts with ``prefix``."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().startswith(prefix):
                found.add(int(pid))
        except OSError:
            continue
    return found


def _kill_first_task(prefix: str, killed: list[int], ran: set[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker running a task named ``prefix...``, once, 0.1 s into the task and only if it is
    still running it then; note every worker seen running such a task (the killed one and the one that retried it)."""
    while not stop.is_set():
        running = _titles(f"ray::{prefix}")
        ran |= running
        if running and not killed:
            time.sleep(0.1)  # inside the trial's run, not at its first instruction
            for pid in running & _titles(f"ray::{prefix}"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
        time.sleep(0.01)


@needs["ray"]
@needs["optuna"]
@needs["mlflow"]
@pytest.mark.slow  # a search on a two-node Ray cluster with a worker killed mid-trial, tracked in MLflow
def test_a_search_on_ray_survives_a_killed_worker_and_is_tracked(cluster: str, tmp_path: Path, registry: Registry) -> None:
    import mlflow

    from torchslim.search import search

    recipe = search_recipe(SPACE, trials=4, sampler="random", seed=5)
    recipe["model"]["kwargs"]["train_epochs"] = 60  # ~1.3 s a trial on a warm worker here: time to kill one
    path = write_recipe(tmp_path, recipe)
    killed: list[int] = []
    ran: set[int] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_first_task, args=("test-trial3", killed, ran, stop), daemon=True)
    watcher.start()
    try:
        result = search(path, tmp_path / "ray", jobs=2, executor=f"ray:{cluster}", track="mlflow", registry=registry)
    finally:
        stop.set()
    watcher.join()
    assert len(killed) == 1, "no worker was killed while it ran trial 3 (the trial ended within 0.1 s)"
    assert len(ran) == 2, f"trial 3 ran on workers {sorted(ran)}: expected the killed one and the one that retried it"
    assert [r.number for r in result.records] == [1, 2, 3, 4] and all(r.ok for r in result.records)  # trial 3 retried
    local = search(path, tmp_path / "local", registry=registry)
    assert _figures(tmp_path / "ray" / "front.json") == _figures(tmp_path / "local" / "front.json")

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("torchslim").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("torchslim.command") == "search")
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(trials) == ["trial 1", "trial 2", "trial 3", "trial 4"]
    three = trials["trial 3"]
    record = local.records[2]
    assert three.data.params["stages.0.amount"] == str(record.values["stages.0.amount"])
    history = client.get_metric_history(three.info.run_id, "accuracy")
    assert [m.step for m in history] == [0, 1, 2] and history[-1].value == record.final["accuracy"]
    assert three.data.tags["torchslim.work_threads"] == "1" and three.data.tags["torchslim.runtime"] == "torch"
    assert {a.path for a in client.list_artifacts(three.info.run_id)} >= {"report.json", "report.md", "recipe.yaml"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"front.json", "front.png", "best.yaml"}


@needs["optuna"]
@pytest.mark.slow  # two search processes at once
def test_two_processes_share_one_sqlite_study(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, search_recipe(SPACE, trials=4, sampler="random", seed=2))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torchslim", "search", str(path), "--out", str(tmp_path / name), "--storage", url, "--resume"],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    ran = sorted(p.name[:3] for name in ("a", "b") for p in (tmp_path / name / "trials").iterdir())
    assert ran == ["001", "002", "003", "004"]  # each trial ran once, in one of the two
    last = max(("a", "b"), key=lambda n: (tmp_path / n / "front.json").stat().st_mtime)
    assert [t[0] for t in _figures(tmp_path / last / "front.json")] == [1, 2, 3, 4]
    whole = subprocess.run(
        [sys.executable, "-m", "torchslim", "search", str(path), "--out", str(tmp_path / "whole")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr
    # random sampling: a trial's values depend on its number alone, so the shared study tried the same values
    assert [t[:2] for t in _figures(tmp_path / last / "front.json")] == [
        t[:2] for t in _figures(tmp_path / "whole" / "front.json")
    ]


@needs["mlflow"]
@pytest.mark.slow  # MLflow creates its SQLite store (seconds)
def test_a_tracked_compare_and_run_are_read_back_with_mlflows_client(cli: Any, tmp_path: Path) -> None:
    import mlflow

    recipe = digits_recipe([{"type": "prune", "name": "prune", "amount": 0.5}], train_epochs=3)
    recipe.update(threads=1, sweep={"stages.0.amount": [0.3, 0.6]})
    path = write_recipe(tmp_path, recipe)
    result = cli("compare", str(path), "--out", str(tmp_path / "study"), "--track", "mlflow")
    assert result.returncode == 0, result.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("torchslim").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "study")
    variants = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id), key=lambda r: r.info.run_name
    )
    assert len(variants) == 2 and all(r.info.status == "FINISHED" for r in variants)
    for index, run in enumerate(variants):
        report = json.loads(Path(client.download_artifacts(run.info.run_id, "report.json", str(tmp_path))).read_text())
        assert report["recipe"]["stages"][0]["amount"] == [0.3, 0.6][index]
        assert run.data.params["stages.0.amount"] == str(report["recipe"]["stages"][0]["amount"])
        assert run.data.metrics["size_bytes"] == report["rows"][-1]["metrics"]["size_bytes"]
        assert run.data.tags["torchslim.cpu"] == report["environment"]["cpu"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"comparison.json", "comparison.md"}

    single = write_recipe(
        tmp_path, digits_recipe([{"type": "prune", "name": "prune", "amount": 0.5}], train_epochs=3), "one.yaml"
    )
    assert cli("run", str(single), "--out", str(tmp_path / "one"), "--track", "mlflow").returncode == 0
    run = next(r for r in client.search_runs([parent.info.experiment_id]) if r.data.tags.get("torchslim.command") == "run")
    assert run.info.run_name == "test" and run.data.params["stages.0.amount"] == "0.5" and "accuracy" in run.data.metrics


OPEN = """
import sys
from pathlib import Path
from torchslim.engine.study_fields import SearchSpec
from torchslim.search.study import Study
Study(Path(sys.argv[1]), SearchSpec(space={"stages.0.amount": {"low": 0.1, "high": 0.5}}, trials=1), "fp", True,
      sys.argv[2])
"""


@needs["optuna"]
@pytest.mark.slow  # three rounds of three processes
def test_searches_started_together_on_a_new_database_all_open_it(tmp_path: Path) -> None:
    """Optuna's tables are created by whichever process comes first; the others ("table ... already exists",
    about one in three here before the retry) open it once they are there."""
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'new{round_}.db'}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN, str(tmp_path), url], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
