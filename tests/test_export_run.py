"""``torchslim export RUN_DIR --to onnx|openvino``: a finished float run exported beside its model.pt, the files
checked by loading them in the runtimes directly, deploy.json, and the runs that do not export."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import torchslim
from torchslim import OutputError, Registry, UserInputError
from torchslim.plugins.deploy import RuntimeModel, export_run

from .conftest import CliResult, digits_recipe
from .test_deploy import _needs

#: The exporter of every export but the one test of the default (dynamo: seconds each, torchscript: tenths).
_QUICK = "torchscript"


def _run(folder: Path, stages: list[dict[str, Any]]) -> Path:
    """A finished run in ``folder``: the digits MLP untrained (the export does not care), only the metric measured."""
    recipe = digits_recipe(stages, train_epochs=0)
    recipe["metrics"].update(collect=False, latency=False)
    torchslim.run(recipe, folder, registry=Registry.load(autoload=False))
    return folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished float run (pruned MLP on the bundled digits), shared: tests export a copy of it."""
    return _run(tmp_path_factory.mktemp("float") / "run", [{"type": "prune", "method": "magnitude", "amount": 0.5}])


@pytest.fixture
def run_dir(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _final_accuracy(run_dir: Path) -> float:
    return float(json.loads((run_dir / "report.json").read_text())["rows"][-1]["metrics"]["accuracy"])


def _check_deploy_json(run_dir: Path, runtime: str, files: list[str]) -> dict[str, Any]:
    info = json.loads((run_dir / "deploy.json").read_text())
    assert info["runtime"] == runtime and info["files"] == sorted(files) and info["opset"] == 18
    assert info["inputs"] == {"input": ["batch", 64]} and info["outputs"] == {"output": ["batch", 10]}
    assert info["metric"] == "accuracy" and info["metric_value"] == _final_accuracy(run_dir)
    assert 0 <= info["parity"]["largest_difference"] <= info["parity"]["allowed"]
    for name in files:
        assert (run_dir / name).stat().st_size > 0
    return info


def _torch_and_batch(run_dir: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    model = torchslim.load_model(run_dir)
    assert not isinstance(model, RuntimeModel)  # export added files; model.pt is the torch model still
    return model, torch.rand(5, 64)  # 5: another batch size than the export's, the batch axis is dynamic


@_needs("onnxruntime")
def test_export_to_onnx(run_dir: Path) -> None:
    import onnxruntime

    before = _digest(run_dir / "model.pt")
    exported = export_run(run_dir, "onnx")
    assert exported.files == ("model.onnx", "deploy.json") and exported.runtime.startswith("onnxruntime ")
    info = _check_deploy_json(run_dir, "onnxruntime", ["model.onnx"])
    assert info["version"] == onnxruntime.__version__.split("-")[0]
    assert _digest(run_dir / "model.pt") == before
    model, batch = _torch_and_batch(run_dir)
    session = onnxruntime.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": batch.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(batch), rtol=1e-4, atol=1e-5)


@_needs("openvino")
def test_export_to_openvino_replaces_an_onnx_export(run_dir: Path) -> None:
    import openvino

    export_run(run_dir, "onnx", exporter=_QUICK)
    with pytest.raises(OutputError, match=r"model\.onnx, deploy\.json already there.*overwrite=True"):
        export_run(run_dir, "openvino", exporter=_QUICK)
    exported = export_run(run_dir, "openvino", exporter=_QUICK, overwrite=True)
    assert exported.files == ("model.xml", "model.bin", "deploy.json")
    _check_deploy_json(run_dir, "openvino", ["model.xml", "model.bin"])
    assert not (run_dir / "model.onnx").exists()  # deploy.json describes every deployable file in the folder
    assert exported.removed == ("model.onnx",)
    assert exported.line().endswith("; removed the earlier export's model.onnx, which deploy.json no longer describes")
    model, batch = _torch_and_batch(run_dir)
    compiled = openvino.Core().compile_model(str(run_dir / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(batch.numpy())[compiled.outputs[0]]
    torch.testing.assert_close(torch.from_numpy(got), model(batch), rtol=1e-4, atol=1e-5)


@_needs("onnxruntime")
def test_cli_exports_and_refuses_to_overwrite(run_dir: Path, cli: Callable[..., CliResult]) -> None:
    done = cli("export", str(run_dir), "--to", "onnx", "--exporter", _QUICK, "--dynamic-axes", "0", "--tolerance", "1e-3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {run_dir}/model.onnx and {run_dir}/deploy.json (onnxruntime ")
    assert "largest difference" in done.stdout
    again = cli("export", str(run_dir), "--to", "onnx")
    assert again.returncode == 2 and "already there" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert cli("export", str(run_dir), "--to", "onnx", "--exporter", _QUICK, "--overwrite").returncode == 0


@_needs("onnxruntime")
def test_parity_mismatch_is_an_error_and_writes_nothing(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    # A model whose exported graph really differs (by 0.1%; tests/support/drift.py): a tiny tolerance alone
    # cannot fail where ONNX Runtime matches torch to the last bit, as it does on the plain MLP on some CPUs.
    recipe = digits_recipe([{"type": "prune", "method": "magnitude", "amount": 0.5}])
    recipe["model"] = {"target": "tests.support.drift:mlp"}
    recipe["metrics"].update(collect=False, latency=False)
    run_dir = tmp_path / "run"
    torchslim.run(recipe, run_dir, registry=Registry.load(autoload=False))
    result = cli("export", str(run_dir), "--to", "onnx", "--exporter", _QUICK)
    assert result.returncode == 2 and "onnxruntime's outputs differ from torch's" in result.stderr
    assert not (run_dir / "model.onnx").exists() and not (run_dir / "deploy.json").exists()


def _not_a_run(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path


@pytest.mark.parametrize(
    ("folder", "args", "message"),
    [
        (lambda tmp: tmp / "missing", [], "missing: no such directory; torchslim export takes a folder written by torchslim run"),
        (_not_a_run, [], "not a torchslim run directory (no model.pt and no recipe.yaml)"),
        (lambda tmp: tmp, ["--opset", "12"], "opset: Input should be greater than or equal to 17"),
        (lambda tmp: tmp, ["--dynamic-axes", "0,x"], "--dynamic-axes: expected input dimensions separated by commas"),
    ],
    ids=["missing", "not-a-run", "opset", "dynamic-axes"],
)
def test_cli_errors(
    tmp_path: Path, cli: Callable[..., CliResult], folder: Callable[[Path], Path], args: list[str], message: str
) -> None:
    result = cli("export", str(folder(tmp_path)), "--to", "onnx", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if folder is _not_a_run:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_quantized_run_does_not_export(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    run_dir = _run(
        tmp_path / "run",
        [{"type": "prune", "method": "magnitude", "amount": 0.5}, {"type": "quantize", "name": "int8", "method": "dynamic"}],
    )
    result = cli("export", str(run_dir), "--to", "openvino")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "quantized in torch (stage int8 (quantize, method dynamic))" in result.stderr
    assert "put {type: deploy, runtime: openvino} in the recipe before the quantize stage" in result.stderr
    assert result.stderr.rstrip().endswith(f"or export the checkpoint taken before it, {run_dir}/checkpoints/stage-01")
    assert not (run_dir / "model.xml").exists()


@_needs("onnxruntime")
def test_deployed_run_does_not_export_again(tmp_path: Path) -> None:
    run_dir = _run(tmp_path / "run", [{"type": "deploy", "runtime": "onnxruntime", "exporter": _QUICK}])
    before = _digest(run_dir / "model.onnx")
    with pytest.raises(UserInputError, match="already deployed to onnxruntime"):
        export_run(run_dir, "onnx", overwrite=True)
    assert _digest(run_dir / "model.onnx") == before


# The last case is an environment with only [dev]: an OpenVINO user is told the extra that brings onnx too.
@pytest.mark.parametrize(
    ("to", "modules", "extra"),
    [("onnx", ("onnxruntime",), "onnx"), ("openvino", ("openvino",), "openvino"), ("openvino", ("onnx", "openvino"), "openvino")],
)
def test_missing_extra_names_it(
    finished: Path, monkeypatch: pytest.MonkeyPatch, to: str, modules: tuple[str, ...], extra: str
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails, as if not installed
    with pytest.raises(UserInputError, match=rf"export to {to}: .*pip install 'torchslim\[{extra}\]'"):
        export_run(finished, to)
