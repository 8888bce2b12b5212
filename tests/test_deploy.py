"""The deploy stage and the runtime quantize methods: export, parity, quantization in ONNX Runtime and
OpenVINO, the artifacts under --out and their reload, the runtime named in each row, missing extras."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import torchslim
from torchslim import Registry, StageError
from torchslim.engine import names

from .conftest import digits_recipe

_MISSING = {
    runtime: [m for m in modules if importlib.util.find_spec(m) is None]
    for runtime, modules in {
        "onnxruntime": ("onnx", "onnxscript", "onnxruntime"),
        "openvino": ("onnx", "onnxscript", "openvino", "nncf"),
    }.items()
}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}


def _needs(runtime: str) -> Any:
    missing = _MISSING[runtime]
    hint = f"{', '.join(missing)} not installed: pip install 'torchslim[{_EXTRA[runtime]}]'"
    return pytest.mark.skipif(bool(missing), reason=hint)


def _recipe(model: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    recipe = digits_recipe(stages)
    if model == "cnn":
        recipe["model"] = {"target": "torchslim.examples.digits:cnn", "kwargs": {"channels": 4, "train_epochs": 2}}
        recipe["data"]["kwargs"]["image"] = True
    return recipe


#: (runtime, quantize method, files under --out)
_CASES = [
    pytest.param("onnxruntime", "ort_static", ("model.onnx",), marks=_needs("onnxruntime"), id="ort-static"),
    pytest.param("openvino", "nncf", ("model.xml", "model.bin"), marks=_needs("openvino"), id="openvino-nncf"),
]


@pytest.mark.parametrize("model", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("runtime", "method", "files"), _CASES)
def test_deploy_quantize_and_reload(
    tmp_path: Path, registry: Registry, runtime: str, method: str, files: tuple[str, ...], model: str
) -> None:
    stages = [{"type": "deploy", "runtime": runtime}, {"type": "quantize", "method": method, "calibration_batches": 2}]
    report = torchslim.run(_recipe(model, stages), tmp_path, registry=registry)
    deployed, quantized = report.rows[1], report.rows[2]
    assert names.RUNTIME not in report.baseline.metrics
    for row in (deployed, quantized):
        assert row.metrics[names.RUNTIME].startswith(runtime + " ")
        assert f"@{runtime}" in report.table().splitlines()[2 + report.rows.index(row)]
    # The float export matches torch: same accuracy (the issue allows 0.05 points).
    assert abs(deployed.metrics["accuracy"] - report.baseline.metrics["accuracy"]) <= 0.05
    assert any("outputs match torch's" in note for note in report.notes)
    assert quantized.metrics["quantized_layers"] >= 2 and quantized.metrics["float_layers"] == 0
    assert quantized.metrics[names.SIZE_BYTES] == sum((tmp_path / f).stat().st_size for f in files)
    for row in (deployed, quantized):  # what a deployed model saves is the runtime's files: packing does not apply
        assert row.metrics[names.PACKED_BYTES] == row.metrics[names.SIZE_BYTES]
    info = json.loads((tmp_path / "deploy.json").read_text())
    assert info["runtime"] == runtime and info["metric"] == "accuracy" and sorted(info["files"]) == sorted(files)
    assert next(iter(info["inputs"].values()))[0] == "batch"
    loaded = torchslim.load_model(tmp_path)
    assert type(loaded) is type(report.model)
    batch = torch.rand(5, *report.model.info["inputs"]["input"][1:])  # another batch size: the axis is dynamic
    torch.testing.assert_close(loaded(batch), report.model(batch))


@_needs("onnxruntime")
def test_ort_dynamic_quantizes_matmuls(registry: Registry) -> None:
    report = torchslim.run(
        _recipe("mlp", [{"type": "deploy", "runtime": "onnxruntime"}, {"type": "quantize", "method": "ort_dynamic"}]),
        registry=registry,
    )
    assert report.final.metrics["quantized_layers"] == 3
    assert report.final.metrics[names.SIZE_BYTES] < 0.7 * report.rows[1].metrics[names.SIZE_BYTES]


@_needs("onnxruntime")
def test_parity_mismatch_is_a_stage_error(registry: Registry) -> None:
    # A model whose exported graph really differs (by 0.1%): a tiny tolerance alone cannot fail where the
    # runtime matches torch to the last bit, as ONNX Runtime does on the plain MLP on some CPUs.
    recipe = _recipe("mlp", [{"type": "deploy", "runtime": "onnxruntime"}])
    recipe["model"] = {"target": "tests.support.drift:mlp"}
    with pytest.raises(StageError, match=r"outputs differ from torch's by up to .* in the session compiled for shape \["):
        torchslim.run(recipe, registry=registry)


@_needs("onnxruntime")
def test_runtime_method_refuses_a_torch_model(registry: Registry) -> None:
    with pytest.raises(StageError, match=r"put \{type: deploy, runtime: onnxruntime\} before"):
        torchslim.run(_recipe("mlp", [{"type": "quantize", "method": "ort_static"}]), registry=registry)


# The last case is an environment with only [dev]: neither onnx nor openvino imports, and the user who
# asked for OpenVINO is told the extra that brings both.
@pytest.mark.parametrize(
    ("runtime", "modules", "extra"),
    [
        ("onnxruntime", ("onnxruntime",), "onnx"),
        ("openvino", ("openvino",), "openvino"),
        ("openvino", ("onnx", "openvino"), "openvino"),
    ],
)
def test_missing_extra_names_it(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, runtime: str, modules: tuple[str, ...], extra: str
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails, as if not installed
    with pytest.raises(StageError, match=rf"pip install 'torchslim\[{extra}\]'"):
        torchslim.run(_recipe("mlp", [{"type": "deploy", "runtime": runtime}]), registry=registry)


class _Text(torch.nn.Module):
    """Token ids (batch x sequence) -> mean embedding -> 3 scores: a text model's shape in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


@_needs("onnxruntime")
def test_sequence_axis_can_be_dynamic() -> None:
    from torchslim.plugins.deploy import DeployStage

    from .conftest import make_ctx

    model = _Text().eval()
    ids = torch.randint(0, 50, (4, 7))
    ctx = make_ctx(model, {"train": [(ids, ids[:, 0])], "eval": [(ids, ids[:, 0])]}, evaluate=lambda m: 0.0)
    deployed = DeployStage(runtime="onnxruntime", dynamic_axes=[0, 1]).apply(model, ctx)
    assert deployed.info["inputs"]["input"] == ["batch", "sequence"]
    longer = torch.randint(0, 50, (2, 11))
    torch.testing.assert_close(deployed(longer), model(longer), rtol=1e-4, atol=1e-5)


@_needs("onnxruntime")
def test_interleaved_timing_waits_out_onnxruntime_spinning_threads() -> None:
    """ONNX Runtime's idle threads spin on after a run and slowed the next model timed 2.2x at 2 threads
    (measured): the interleaved timing waits them out, untimed, after each run of an ONNX Runtime model."""
    import time

    from torchslim.engine.timing import interleaved
    from torchslim.plugins.deploy import DeployStage

    from .conftest import make_ctx

    model = _Text().eval()
    ids = torch.randint(0, 50, (4, 7))
    ctx = make_ctx(model, {"train": [(ids, ids[:, 0])], "eval": [(ids, ids[:, 0])]}, evaluate=lambda m: 0.0)
    deployed = DeployStage(runtime="onnxruntime").apply(model, ctx)
    start = time.perf_counter()
    timing, torch_timing = interleaved([deployed, model], ids, warmup=0, runs=3, threads=1)
    assert time.perf_counter() - start >= 3 * deployed.settle_seconds > 0
    assert sum(timing.samples) < 1000 * 3 * deployed.settle_seconds  # the wait is not in the figure
    assert len(torch_timing.samples) == 3


@pytest.mark.parametrize(
    "runtime", [pytest.param("onnxruntime", marks=_needs("onnxruntime")), pytest.param("openvino", marks=_needs("openvino"))]
)
def test_first_input_shapes_get_sessions_of_their_own(runtime: str) -> None:
    """``static_shapes: 1``: the first shape runs in a session compiled for that shape alone, a later shape in
    the session of the dynamic axes; the parity check runs both, and both give torch's outputs."""
    from torchslim.plugins.deploy import DeployStage

    from .conftest import make_ctx

    model = _Text().eval()
    ids = torch.randint(0, 50, (4, 7))
    ctx = make_ctx(model, {"train": [(ids, ids[:, 0])], "eval": [(ids, ids[:, 0])]}, evaluate=lambda m: 0.0)
    deployed = DeployStage(runtime=runtime, dynamic_axes=[0, 1], static_shapes=1).apply(model, ctx)
    threads = torch.get_num_threads()
    assert set(deployed._sessions) == {(threads, (4, 7)), (threads, None)}  # the parity check ran both
    longer = torch.randint(0, 50, (2, 11))
    for batch in (ids, longer, ids):
        torch.testing.assert_close(deployed(batch), model(batch), rtol=1e-4, atol=1e-5)
    assert set(deployed._sessions) == {(threads, (4, 7)), (threads, None)}
    assert _input_shape(deployed._sessions[threads, (4, 7)]) == [4, 7]
    assert _input_shape(deployed._sessions[threads, None]) == ["batch", "sequence"]
    assert not copy.deepcopy(deployed)._sessions  # a copy compiles its own


@pytest.mark.parametrize(
    "runtime", [pytest.param("onnxruntime", marks=_needs("onnxruntime")), pytest.param("openvino", marks=_needs("openvino"))]
)
def test_calls_reuse_the_session_and_keep_their_outputs(runtime: str) -> None:
    """A call costs the runtime plus a few microseconds (bench/overhead_bench.py): OpenVINO's infer request is made
    once per session and reused, so each output must be copied out of its buffer before the next call overwrites
    it; inputs that are not plain CPU arrays (non-contiguous, requiring grad) are converted, not refused."""
    from torchslim.plugins.deploy import DeployStage

    from .conftest import make_ctx

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x, other = torch.randn(4, 6), torch.randn(4, 6)
    ctx = make_ctx(model, {"train": [(x, x[:, 0])], "eval": [(x, x[:, 0])]}, evaluate=lambda m: 0.0)
    deployed = DeployStage(runtime=runtime).apply(model, ctx)
    session = deployed._sessions[torch.get_num_threads(), (4, 6)]
    with torch.inference_mode():
        first, second = deployed(x), deployed(other)
        torch.testing.assert_close(first, model(x), rtol=1e-4, atol=1e-5)  # not overwritten by the second call
        torch.testing.assert_close(second, model(other), rtol=1e-4, atol=1e-5)
    assert deployed._sessions[torch.get_num_threads(), (4, 6)] is session
    if runtime == "openvino":
        assert session.request is deployed._sessions[torch.get_num_threads(), (4, 6)].request  # one request, reused
        torch.testing.assert_close(deployed(x.double()), first)  # cast to the model's type, as compiled_model(array) does
    strided = torch.randn(6, 4).t()
    assert not strided.is_contiguous()
    torch.testing.assert_close(deployed(strided), model(strided).detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deployed(x.clone().requires_grad_()), model(x).detach(), rtol=1e-4, atol=1e-5)


def _input_shape(session: Any) -> list[Any]:
    """The input shape a session was built for, a dynamic axis by its name."""
    if isinstance(session, tuple):  # ONNX Runtime: (session, input name, output names); fixed axes read as their sizes
        return list(session[0].get_inputs()[0].shape)
    dims = session.compiled.inputs[0].get_partial_shape()  # OpenVINO: the compiled model and its infer request
    return [d.get_length() if d.is_static else ["batch", "sequence"][i] for i, d in enumerate(dims)]


SIGNAL_AFTER_SESSIONS = """
import gc, logging, signal
import torch
from torch import nn
from torchslim.engine.stage import Context
from torchslim.plugins.deploy import DeployStage

model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
x = torch.randn(4, 8)
ctx = Context(original=model, data={"eval": [(x, x[:, 0])]}, example_inputs=x, evaluate=lambda m: 0.0,
              log=logging.getLogger("test"))
deployed = DeployStage(runtime="openvino", static_shapes=1).apply(model, ctx)  # two sessions: parity ran both
del deployed  # destroyed in the order they were compiled
gc.collect()


class Alarm(BaseException):
    pass


def ring(*_):
    raise Alarm


signal.signal(signal.SIGALRM, ring)
signal.setitimer(signal.ITIMER_REAL, 0.01)
try:
    while True:
        pass
except Alarm:
    print("handled")
"""


@_needs("openvino")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the alternate signal stack is kept on Linux")
def test_a_signal_after_openvino_sessions_are_gone_is_handled(tmp_path: Path) -> None:
    """OpenVINO's compiled models each put back, when destroyed, the signal stack they found; destroyed in the
    order they were made they left the thread on a freed one, and the next signal Python handled (an alarm here,
    Ctrl-C for a user) crashed the process with SIGSEGV."""
    import subprocess

    script = tmp_path / "signal_after_sessions.py"
    script.write_text(SIGNAL_AFTER_SESSIONS)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1]
    )
    assert done.returncode == 0 and "handled" in done.stdout, (done.returncode, done.stderr[-2000:])
