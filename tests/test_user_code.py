"""The user's own code: a module next to the recipe, its failures named by recipe field, the Python side."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

import torchslim
from torchslim import Context, Registry, Stage, StageEntry, StageError
from torchslim.examples import digits

from .conftest import ROOT, CliResult, digits_recipe, write_recipe

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, inputs, hidden):
        super().__init__()
        self.features = nn.Linear(inputs, hidden)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.classifier(torch.relu(self.features(x)))


def build(hidden: int = 16, inputs: int = 64):
    return Net(inputs, hidden)


def broken(hidden: int = 16):
    raise ValueError("no weights file for this size")


def no_data(batch_size: int = 64):
    raise FileNotFoundError("data/train.csv")


def score(model, loader):
    raise KeyError("labels")


def digits_targets(form: str = "one_hot"):
    """The bundled digits with their targets as one-hot floats, or as a 5-wide float vector (fits nothing)."""
    from torchslim.examples import digits

    def recoded(loader):
        width = 10 if form == "one_hot" else 5
        return [(x, torch.nn.functional.one_hot(y % width, width).float()) for x, y in loader]

    return {split: recoded(loader) for split, loader in digits.loaders(batch_size=64).items()}


def text_score(model, loader):
    return "high"
'''


@pytest.fixture
def user_module(tmp_path: Path) -> Iterator[str]:
    """A module with a unique name written next to the recipes of ``tmp_path`` (not on sys.path)."""
    name = f"usernet_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(NET)
    yield name
    sys.modules.pop(name, None)


def user_recipe(folder: Path, module: str, **changes: Any) -> Path:
    """A recipe whose model is ``module:build`` (next to it), with ``changes`` to its top-level fields."""
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}])
    recipe["model"] = {"target": f"{module}:build", "kwargs": {"hidden": 16}}
    recipe.update(changes)
    return write_recipe(folder, recipe)


def line_of(path: Path, token: str) -> int:
    """The 1-based number of the first line of ``path`` holding ``token``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if token in line)


def assert_located(result: CliResult, path: Path, token: str, code: int = 2) -> None:
    """Exit ``code``, the error starts at the line holding ``token``, and no traceback was printed."""
    assert result.returncode == code, result.stderr
    match = re.search(rf"error: {re.escape(str(path))}:(\d+):\d+: ", result.stderr)
    assert match and int(match[1]) == line_of(path, token), result.stderr
    assert "Traceback" not in result.stderr


def test_module_next_to_the_recipe_is_importable(tmp_path: Path, user_module: str, cli: Callable[..., CliResult]) -> None:
    path = user_recipe(tmp_path, user_module)
    before = list(sys.path)
    assert cli("validate", str(path)).returncode == 0
    result = cli("run", "-q", str(path))
    assert result.returncode == 0, result.stderr
    assert "baseline" in result.stdout
    assert sys.path == before  # the recipe's directory was importable only while it ran


def test_unknown_kwarg_names_the_parameters(tmp_path: Path, user_module: str, cli: Callable[..., CliResult]) -> None:
    path = user_recipe(tmp_path, user_module, model={"target": f"{user_module}:build", "kwargs": {"hiden": 16}})
    for command in ("validate", "run"):
        result = cli(command, str(path))
        assert_located(result, path, "hiden")
        assert (
            f"model.kwargs.hiden: {user_module}:build(hidden: int = 16, inputs: int = 64) does not accept these "
            "kwargs: got an unexpected keyword argument 'hiden'; did you mean 'hidden'?"
        ) in result.stderr


def test_factory_that_raises(tmp_path: Path, user_module: str, cli: Callable[..., CliResult]) -> None:
    path = user_recipe(tmp_path, user_module, model={"target": f"{user_module}:broken"})
    result = cli("run", str(path))
    assert_located(result, path, "broken")
    assert f"model.target: {user_module}:broken() raised ValueError: no weights file for this size" in result.stderr
    assert "rerun with --debug to see the traceback" in result.stderr
    debug = cli("run", "--debug", str(path))
    assert debug.returncode == 2
    assert f"{user_module}.py" in debug.stderr and "Traceback" in debug.stderr  # the user's own frame


def test_data_factory_that_raises(tmp_path: Path, user_module: str, cli: Callable[..., CliResult]) -> None:
    path = user_recipe(tmp_path, user_module, data={"target": f"{user_module}:no_data"})
    result = cli("run", str(path))
    assert_located(result, path, "no_data")
    assert f"data.target: {user_module}:no_data() raised FileNotFoundError: data/train.csv" in result.stderr


def test_inputs_that_do_not_fit_the_model(tmp_path: Path, user_module: str, cli: Callable[..., CliResult]) -> None:
    path = user_recipe(tmp_path, user_module, model={"target": f"{user_module}:build", "kwargs": {"inputs": 10}})
    result = cli("run", str(path))
    assert_located(result, path, f"{user_module}:build")
    assert (
        f"model.target: {user_module}:build fails on a batch of data.target torchslim.examples.digits:loaders "
        "(inputs of shape [256, 64], torch.float32): RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    ) in result.stderr


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        (
            "score",
            "evaluate.metric: measuring the model before any stage failed (model {m}:build, data "
            "torchslim.examples.digits:loaders, metric {m}:score): KeyError: 'labels'",
        ),
        ("text_score", "evaluate.metric: returned str, expected a float"),
    ],
    ids=["raises", "not-a-float"],
)
def test_metric_failures(tmp_path: Path, user_module: str, cli: Callable[..., CliResult], metric: str, message: str) -> None:
    path = user_recipe(tmp_path, user_module, evaluate={"metric": f"{user_module}:{metric}"})
    result = cli("run", str(path))
    assert_located(result, path, f"{user_module}:{metric}")
    assert message.format(m=user_module) in result.stderr


def test_one_hot_targets_score_as_their_class(tmp_path: Path, user_module: str, registry: Registry) -> None:
    one_hot = torchslim.run(
        user_recipe(tmp_path, user_module, data={"target": f"{user_module}:digits_targets"}), registry=registry
    )
    labels = torchslim.run(user_recipe(tmp_path, user_module), registry=registry)
    assert one_hot.baseline.metrics["accuracy"] == labels.baseline.metrics["accuracy"]


def test_targets_that_fit_no_accuracy_name_the_metric(tmp_path: Path, user_module: str, cli: Callable[..., CliResult]) -> None:
    data = {"target": f"{user_module}:digits_targets", "kwargs": {"form": "five"}}
    path = user_recipe(tmp_path, user_module, data=data)
    result = cli("run", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        f"evaluate.metric: accuracy on data.target {user_module}:digits_targets: the built-in accuracy compares the "
        "highest of the model's scores (outputs of shape [256, 10]) with class indices of shape [256] or one-hot "
        "targets of the outputs' shape; the eval loader's targets are [256, 5], torch.float32"
    ) in result.stderr


def test_name_defaults_to_the_file_stem(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    recipe = digits_recipe([{"type": "quantize"}])
    del recipe["name"]
    result = cli("validate", str(write_recipe(tmp_path, recipe, "my-first.yaml")), "--no-import")
    assert result.returncode == 0, result.stderr
    assert "valid recipe 'my-first' with 1 stage: quantize (quantize)" in result.stdout


class BreakStage(Stage):
    """A stage whose model fails in its next forward, as a pruned model with a stale shape would."""

    type: Literal["break"] = "break"

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Return a model whose first layer no longer takes the data's inputs."""
        return nn.Sequential(nn.Linear(3, 10))


def test_measurement_after_a_stage_is_that_stage(tmp_path: Path, registry: Registry) -> None:
    registry.add(StageEntry("break", "tests", "tests:BreakStage", cls=BreakStage))
    with pytest.raises(StageError) as info:
        torchslim.run(digits_recipe([{"type": "break", "name": "cut"}], train_epochs=0), tmp_path / "out", registry=registry)
    assert str(info.value).startswith(
        "stage cut: the model it returned fails in the measurement after the stage: "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    )
    assert info.value.exit_code == 1
    assert "Traceback" in (tmp_path / "out" / "torchslim.log").read_text()


def test_validate_checks_checkpoint_files(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}])
    recipe["model"]["checkpoint"] = "weights/missing.pt"
    path = write_recipe(tmp_path, recipe)
    result = cli("validate", str(path))
    assert_located(result, path, "missing.pt")
    assert f"model.checkpoint: file not found: {tmp_path / 'weights/missing.pt'}" in result.stderr


def test_validate_checks_that_torchao_imports(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    try:
        import torchao  # noqa: F401

        pytest.skip("torchao is installed here")
    except ImportError:
        pass
    path = write_recipe(tmp_path, digits_recipe([{"type": "quantize", "method": "static", "backend": "torchao"}]))
    result = cli("validate", str(path))
    assert_located(result, path, "- type: quantize")
    assert "stages[0] (quantize): stage quantize: method static, backend torchao: torchao does not import" in result.stderr
    assert cli("validate", "--no-import", str(path)).returncode == 0


def test_run_hands_back_the_model(tmp_path: Path, registry: Registry) -> None:
    recipe = digits_recipe([{"type": "quantize", "dtype": "qint8"}], train_epochs=0)
    report = torchslim.run(recipe, registry=registry)
    assert isinstance(report.model, nn.Module) and not report.model.training
    inputs = torch.rand(4, 64)
    assert report.model(inputs).shape == (4, 10)
    assert "model" not in report.to_dict()
    import pickle

    assert pickle.loads(pickle.dumps(report)).model is None  # compare's workers send reports without it


def test_load_model_does_not_retrain(tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    report = torchslim.run(digits_recipe([{"type": "prune", "amount": 0.5}], train_epochs=2), out, registry=registry)
    calls: list[int] = []
    monkeypatch.setattr(digits, "fit", lambda *args, **kwargs: calls.append(1))
    loaded = torchslim.load_model(out, registry)
    assert calls == []  # the saved weights replace the factory's: no training
    inputs = torch.rand(4, 64)
    assert report.model is not None
    torch.testing.assert_close(loaded(inputs), report.model(inputs))
    assert not torchslim.weights_will_load()
    digits.mlp(hidden=8, train_epochs=1)
    assert calls == [1]  # outside load_model the factory trains as asked


def test_output_error_speaks_python_to_python(tmp_path: Path, registry: Registry, cli: Callable[..., CliResult]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}], train_epochs=0)
    with pytest.raises(torchslim.OutputError, match=r"pass resume=True .* or overwrite=True \(which"):
        torchslim.run(recipe, out, registry=registry)
    result = cli("run", str(write_recipe(tmp_path, recipe)), "--out", str(out))
    assert result.returncode == 2
    assert "choose another --out, pass --resume to continue a run there, or --overwrite (which" in result.stderr


@pytest.mark.slow
def test_no_traceback_in_a_real_console(tmp_path: Path, user_module: str) -> None:
    path = user_recipe(tmp_path, user_module, model={"target": f"{user_module}:build", "kwargs": {"hiden": 16}})
    result = subprocess.run(
        [sys.executable, "-m", "torchslim", "run", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 2
    assert "did you mean 'hidden'?" in result.stderr and "Traceback" not in result.stderr


def test_closed_pipe_ends_quietly() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "torchslim", "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader went away, as `| head` does
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
