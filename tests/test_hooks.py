"""Every hook of torchslim/engine/hooks.py, used by one small real plugin and honoured by a real run.

The plugin (docs/plugins.md walks through its hooks) has two stages, registered by entry point from a
dist-info folder written for the test, as an installed package's would be:

- ``int8_numpy`` stores every Conv2d and Linear weight as int8 codes with a scale per output channel and
  computes the layer with numpy, where torch's FLOP counter cannot see it: its layers are PackedWeight,
  LinearShaped or ConvShaped.
- ``numpy_deploy`` moves a Sequential model into a tiny numpy "runtime" whose one file, ``model.npz``,
  holds every array: the stage is a RuntimeStage with a check_environment, the model it returns is
  Deployed, CountsWeights, CountsMacs and Settles.

One run of the bundled digits through both stages (with ``--out``) is shared by the tests.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import Field
from torch import nn

import torchslim
from torchslim import Context, Registry, Stage, StageError
from torchslim.compare.runtimes import deploy_position
from torchslim.engine import hooks
from torchslim.engine.metrics import count_macs
from torchslim.engine.recipe import validate
from torchslim.engine.registry import AUTOLOAD_ENV
from torchslim.engine.yamlio import Document
from torchslim.examples import digits

from .conftest import FAST_METRICS, ROOT, CliResult, digits_recipe, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SETTLE = 0.1
"""The numpy model's settle_seconds in the shared run: long beside a forward pass of the tiny CNN (well under 1 ms)."""
RUNS = 3
"""Timed runs per row."""


# --- the plugin: numpy kernels ----------------------------------------------------------------------------


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``x @ weight.T + bias``."""
    out = x @ weight.T
    return out if bias is None else out + bias


def conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, padding: int) -> np.ndarray:
    """A stride-1, ungrouped 2-d convolution: one matrix product over the padded input's windows."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = sliding_window_view(x, weight.shape[2:], axis=(2, 3))  # N, C, H, W, kh, kw
    n, _, h, w = windows.shape[:4]
    columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n, h, w, -1)
    out = (columns @ weight.reshape(len(weight), -1).T).transpose(0, 3, 1, 2)
    return out if bias is None else out + bias[:, None, None]


def conv_padding(layer: nn.Conv2d, label: str) -> int:
    """The one padding of a Conv2d these kernels can run; StageError for any other convolution."""
    pad = layer.padding
    if layer.stride != (1, 1) or layer.dilation != (1, 1) or layer.groups != 1 or isinstance(pad, str) or pad[0] != pad[1]:
        raise StageError(label, f"numpy runs stride-1, ungrouped convolutions with even padding only, not {layer}")
    return int(pad[0])


# --- the plugin: int8_numpy, layers the FLOP counter cannot see -----------------------------------------


class Int8Layer(nn.Module):
    """A Linear or Conv2d whose weight is int8 codes times a scale per output channel, computed by numpy.

    No parameters: ``weight()`` gives the weight (PackedWeight), and torch's attribute names give its shape
    (LinearShaped: ``in_features``/``out_features``; ConvShaped: ``in_channels``/``groups``/``kernel_size``).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, shape: list[int], bias: bool, padding: int = 0) -> None:
        super().__init__()
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(shape[0]))
        self.register_buffer("bias", torch.zeros(shape[0]) if bias else None)
        if len(shape) == 2:
            self.out_features, self.in_features = shape
        else:
            self.out_channels, self.in_channels, self.groups = shape[0], shape[1], 1
            self.kernel_size, self.padding = tuple(shape[2:]), padding

    @classmethod
    def of(cls, layer: nn.Linear | nn.Conv2d, label: str) -> Int8Layer:
        """``layer`` rounded to int8, symmetric, one scale per output channel."""
        weight = layer.weight.detach()
        padding = conv_padding(layer, label) if isinstance(layer, nn.Conv2d) else 0
        new = cls(list(weight.shape), layer.bias is not None, padding)
        scale = weight.abs().flatten(1).amax(dim=1).clamp(min=1e-12) / 127
        with torch.no_grad():
            new.codes.copy_((weight / new._per_row(scale)).round().clamp(-127, 127).to(torch.int8))
            new.scale.copy_(scale)
            if new.bias is not None and layer.bias is not None:
                new.bias.copy_(layer.bias.detach())
        return new

    def spec(self) -> dict[str, Any]:
        """What restore needs to build an empty layer of this shape."""
        return {"shape": list(self.codes.shape), "bias": self.bias is not None, "padding": getattr(self, "padding", 0)}

    def _per_row(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *([1] * (self.codes.dim() - 1)))

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (PackedWeight)."""
        return self.codes.float() * self._per_row(self.scale)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The float layer's function on the dequantized weight, in numpy."""
        x, weight = inputs.detach().cpu().numpy(), self.weight().numpy()
        bias = None if self.bias is None else self.bias.numpy()
        out = linear(x, weight, bias) if hasattr(self, "in_features") else conv(x, weight, bias, self.padding)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


class Int8Numpy(Stage):
    """Every Conv2d and Linear stored as int8 (a scale per output channel) and computed by numpy."""

    type: Literal["int8_numpy"] = "int8_numpy"
    """The stage type: ``int8_numpy``."""
    layers: dict[str, int] | None = None
    """The layers stored int8 (``{name: 8}``); null: every Linear and Conv2d."""

    # PerUnit: torchslim sensitivity measures one layer at a time
    unit_kind: ClassVar[str] = "layer"
    unit_setting: ClassVar[str] = "bits"
    unit_option: ClassVar[str] = "layers"

    def units(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        return [name for name, layer in model.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))]

    def uniform_setting(self) -> float:
        return 8.0

    def alone(self, unit: str, setting: float, units: Any) -> Int8Numpy:
        return self.model_copy(update={"layers": {unit: int(setting)}})

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Swap the layers in place; record their shapes for restore."""
        layers = {}
        for name, layer in list(model.named_modules()):
            if isinstance(layer, (nn.Linear, nn.Conv2d)) and (self.layers is None or name in self.layers):
                new = Int8Layer.of(layer, self.label)
                model.set_submodule(name, new)
                layers[name] = new.spec()
        if not layers:
            raise StageError(self.label, "the model has no Linear or Conv2d layer")
        ctx.add_metric("int8_layers", len(layers))
        ctx.record_for_restore(layers=layers)
        return model

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Empty int8 layers where apply put them; the saved buffers fill them."""
        for name, spec in record["layers"].items():
            model.set_submodule(name, Int8Layer(spec["shape"], spec["bias"], spec["padding"]))
        return model


# --- the plugin: numpy_deploy, a model in a runtime of its own ------------------------------------------


def _affine(x: np.ndarray, a: Mapping[str, np.ndarray], p: str, _: Mapping[str, Any]) -> np.ndarray:
    return x * a[p + "scale"][:, None, None] + a[p + "shift"][:, None, None]


OPS: dict[str, Callable[[np.ndarray, Mapping[str, np.ndarray], str, Mapping[str, Any]], np.ndarray]] = {
    "linear": lambda x, a, p, o: linear(x, a[p + "weight"], a.get(p + "bias")),
    "conv": lambda x, a, p, o: conv(x, a[p + "weight"], a.get(p + "bias"), o["padding"]),
    "affine": _affine,
    "relu": lambda x, a, p, o: np.maximum(x, 0),
    "mean": lambda x, a, p, o: x.mean(axis=(2, 3), keepdims=True),
    "flatten": lambda x, a, p, o: x.reshape(len(x), -1),
}
"""The runtime's ops: ``(x, arrays, prefix of this op's arrays, options) -> y``."""


def describe(layer: nn.Module, label: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """A layer as the runtime runs it: its op, the op's options and its arrays."""
    if isinstance(layer, (Int8Layer, nn.Linear, nn.Conv2d)):
        weight = layer.weight() if isinstance(layer, Int8Layer) else layer.weight
        arrays = {"weight": weight} if layer.bias is None else {"weight": weight, "bias": layer.bias}
        if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):
            return "linear", {}, arrays
        padding = layer.padding if isinstance(layer, Int8Layer) else conv_padding(layer, label)
        return "conv", {"padding": padding}, arrays
    if isinstance(layer, nn.BatchNorm2d) and layer.running_var is not None and layer.running_mean is not None:
        scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
        return "affine", {}, {"scale": scale, "shift": layer.bias - layer.running_mean * scale}
    simple = {nn.ReLU: "relu", nn.Flatten: "flatten"}
    if type(layer) in simple:
        return simple[type(layer)], {}, {}
    if isinstance(layer, nn.AdaptiveAvgPool2d) and layer.output_size in (1, (1, 1)):
        return "mean", {}, {}
    raise StageError(label, f"numpy has no op for {type(layer).__name__}; it runs {', '.join(OPS)}")


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The arrays as one .npz file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class NumpyModel(nn.Module):
    """A Sequential model run by numpy from one file, model.npz, held as a uint8 buffer (so it is saved
    with model.pt and loads with weights_only). Each forward pass logs ``(batch, start, end)`` in ``calls``."""

    file: torch.Tensor

    def __init__(self, content: bytes | int, ops: list[list[Any]], macs: int | None, settle: float) -> None:
        super().__init__()
        data = (
            torch.zeros(content, dtype=torch.uint8)
            if isinstance(content, int)
            else torch.frombuffer(bytearray(content), dtype=torch.uint8)
        )
        self.register_buffer("file", data)
        self.ops, self.macs = ops, macs
        self.settle_seconds = settle  # Settles
        self.calls: list[tuple[int, float, float]] = []
        self._arrays: dict[str, np.ndarray] | None = None
        self.register_load_state_dict_post_hook(_forget_arrays)

    def arrays(self) -> dict[str, np.ndarray]:
        """The file's arrays, read once per file."""
        if self._arrays is None:
            with np.load(io.BytesIO(self.file.numpy().tobytes()), allow_pickle=False) as npz:
                self._arrays = {name: npz[name] for name in npz.files}
        return self._arrays

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the ops in numpy."""
        start = time.perf_counter()
        x, arrays = inputs.detach().cpu().numpy(), self.arrays()
        for index, (op, options) in enumerate(self.ops):
            x = OPS[op](x, arrays, f"{index}.", options)
        self.calls.append((len(inputs), start, time.perf_counter()))
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def counted_weights(self) -> list[torch.Tensor]:
        """Every array of the file (CountsWeights)."""
        return [torch.from_numpy(array) for array in self.arrays().values()]

    def counted_macs(self, example: torch.Tensor) -> int | None:
        """The MACs counted on the torch model before it was deployed (CountsMacs)."""
        return self.macs

    def file_bytes(self) -> int:
        """Bytes of model.npz (Deployed)."""
        return self.file.numel()

    def deploy_files(self) -> dict[str, bytes]:
        """model.npz, written under --out (Deployed)."""
        return {"model.npz": self.file.numpy().tobytes()}

    def deploy_info(self) -> dict[str, Any]:
        """deploy.json (Deployed)."""
        return {"runtime": "numpy", "version": np.__version__, "files": ["model.npz"], "ops": [op for op, _ in self.ops]}


def _forget_arrays(module: NumpyModel, _keys: Any) -> None:
    module._arrays = None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


class NumpyDeploy(Stage):
    """Run a Sequential model (Conv2d, BatchNorm2d, ReLU, AdaptiveAvgPool2d(1), Flatten, Linear, float or
    int8_numpy's) in numpy from here on."""

    type: Literal["numpy_deploy"] = "numpy_deploy"
    """The stage type: ``numpy_deploy``."""
    runtime: Literal["numpy"] = "numpy"
    """Where the model runs from here on (RuntimeStage)."""
    numpy_at_least: str = "1.22"
    """The oldest numpy this stage runs on (check_environment)."""
    settle_seconds: float = Field(default=0.0, ge=0)
    """How long latency timing waits, untimed, after each timed call of the deployed model (Settles)."""

    def installed_runtime(self) -> str | None:
        """``numpy 2.x.y`` (RuntimeStage)."""
        return f"numpy {np.__version__}"

    def check_environment(self) -> None:
        """StageError, naming the option, if the installed numpy is older than ``numpy_at_least``."""
        if _version(np.__version__) < _version(self.numpy_at_least):
            raise StageError(
                self.label,
                f"numpy_at_least: numpy {np.__version__} is installed; this stage needs numpy >= {self.numpy_at_least}",
            )

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """The model as a NumpyModel, after checking its outputs match torch's."""
        self.check_environment()
        if not isinstance(model, nn.Sequential):
            raise StageError(self.label, f"numpy runs an nn.Sequential, not {type(model).__name__}")
        ops, arrays = [], {}
        with torch.no_grad():
            for index, layer in enumerate(model):
                op, options, tensors = describe(layer, self.label)
                ops.append([op, options])
                arrays.update({f"{index}.{k}": v.detach().cpu().float().numpy() for k, v in tensors.items()})
        example = ctx.example_inputs.cpu()
        deployed = NumpyModel(npz_bytes(arrays), ops, count_macs(model, example[:1]), self.settle_seconds)
        with torch.no_grad():
            expected, got = model(example), deployed(example)
        difference = float((expected - got).abs().max()) / max(1.0, float(expected.abs().max()))
        if difference > 1e-4:
            raise StageError(self.label, f"numpy's outputs differ from torch's by {difference:.3g} of the largest")
        ctx.add_metric("runtime", self.installed_runtime())
        ctx.note(f"{self.label}: run in {self.installed_runtime()} from here on")
        ctx.record_for_restore(size=deployed.file_bytes(), ops=ops, macs=deployed.macs)
        return deployed

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """An empty NumpyModel of the saved file's size; the saved buffer fills it."""
        return NumpyModel(int(record["size"]), record["ops"], record["macs"], self.settle_seconds)


# --- registration and the shared run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the plugin's dist-info with its ``torchslim.stages`` entry points, as pip leaves one."""
    folder = tmp_path_factory.mktemp("site")
    info = folder / "torchslim_hooks_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchslim-hooks-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[torchslim.stages]\nint8_numpy = tests.test_hooks:Int8Numpy\nnumpy_deploy = tests.test_hooks:NumpyDeploy\n"
    )
    return folder


def hooks_recipe(**deploy: Any) -> dict[str, Any]:
    """The digits CNN through both stages of the plugin."""
    recipe = digits_recipe([{"type": "int8_numpy"}, {"type": "numpy_deploy", **deploy}])
    recipe["model"] = {"target": "torchslim.examples.digits:cnn", "kwargs": {"channels": 8, "train_epochs": 1}}
    recipe["data"]["kwargs"]["image"] = True
    recipe["metrics"] = {**FAST_METRICS, "runs": RUNS}
    return recipe


@pytest.fixture(scope="module")
def plugins(site: Path) -> Registry:
    """The built-in stages and the plugin's, found by its entry points."""
    return Registry.load(autoload=True, path=[str(site)])


@pytest.fixture(scope="module")
def finished(plugins: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """One run of the recipe with --out: its report and the out folder."""
    out = tmp_path_factory.mktemp("run") / "out"
    return torchslim.run(hooks_recipe(settle_seconds=SETTLE), out, registry=plugins), out


def test_the_plugin_is_registered_by_its_entry_points(plugins: Registry) -> None:
    entries = {entry.type: entry for entry in plugins.entries}
    for tag, cls in (("int8_numpy", Int8Numpy), ("numpy_deploy", NumpyDeploy)):
        assert entries[tag].cls is cls and entries[tag].origin == "torchslim-hooks-plugin 0.1"


def declared_hooks() -> list[type]:
    """The protocols of torchslim/engine/hooks.py."""
    return [obj for obj in vars(hooks).values() if getattr(obj, "_is_protocol", False) and obj.__module__ == hooks.__name__]


def test_docs_list_every_hook() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    names = [hook.__name__ for hook in declared_hooks()]
    assert len(names) >= 9 and [name for name in names if f"`{name}`" not in text] == []


def test_the_plugin_uses_every_declared_hook(finished: tuple[Any, Path]) -> None:
    declared = declared_hooks()
    plugin = [*finished[0].model.modules(), Int8Layer([4, 3], True), Int8Layer([4, 3, 3, 3], True, 1), NumpyDeploy(), Int8Numpy()]
    unused = {hook.__name__ for hook in declared if not any(isinstance(obj, hook) for obj in plugin)}
    assert unused == {"PackedRecurrent"}  # torch.ao's dynamic LSTM/GRU interface: tests/test_recurrent.py


# --- each hook, honoured ---------------------------------------------------------------------------------


def test_sensitivity_measures_a_per_unit_stage(plugins: Registry, tmp_path: Path) -> None:
    """PerUnit: torchslim sensitivity compresses each layer of the plugin's stage alone."""
    from torchslim.engine.recipe import validate
    from torchslim.engine.yamlio import Document
    from torchslim.search.sensitivity import measure

    recipe = validate(Document(hooks_recipe(), "<test>"), plugins)
    found = measure(recipe, tmp_path, stages=[0], settings=[8], batches=1).stages[0]
    assert len(found.units) >= 3 and len(found.probes) == len(found.units)  # every Linear and Conv2d of the CNN
    assert all(p.error is not None and 0 < p.error < 0.05 for p in found.probes)  # int8: a small change each


def test_packed_and_shaped_layers_are_counted(finished: tuple[Any, Path]) -> None:
    """PackedWeight: params; LinearShaped, ConvShaped: MACs of layers the FLOP counter cannot see."""
    report, _ = finished
    baseline, int8 = report.rows[0].metrics, report.rows[1].metrics
    assert int8["int8_layers"] == 3
    assert int8["params"] == baseline["params"] > 1000  # 0 if the int8 weights were not counted
    assert int8["macs"] == baseline["macs"] > 70_000  # 0 if the numpy kernels' layers were not counted


def test_counted_weights_and_macs_of_the_deployed_model(finished: tuple[Any, Path]) -> None:
    """CountsWeights: params and non-zeros are the file's arrays; CountsMacs: the MACs column."""
    report, out = finished
    baseline, deployed = report.rows[0].metrics, report.rows[2].metrics
    with np.load(out / "model.npz") as npz:
        arrays = [npz[name] for name in npz.files]
    assert deployed["params"] == sum(a.size for a in arrays) == baseline["params"]
    assert deployed["nonzero"] == sum(int(np.count_nonzero(a)) for a in arrays)
    assert deployed["macs"] == baseline["macs"]


def test_deployed_files_are_written_and_are_the_size(finished: tuple[Any, Path]) -> None:
    """Deployed: size_bytes is file_bytes(), and --out holds the files and deploy.json."""
    report, out = finished
    assert report.rows[2].metrics["size_bytes"] == report.model.file_bytes() == (out / "model.npz").stat().st_size
    info = json.loads((out / "deploy.json").read_text())
    assert info == {**report.model.deploy_info(), "metric": "accuracy"}
    assert info["files"] == ["model.npz"] and info["runtime"] == "numpy"


def test_deployed_model_loads_back_through_restore(finished: tuple[Any, Path], plugins: Registry) -> None:
    report, out = finished
    inputs = next(iter(digits.loaders(image=True)["eval"]))[0]
    assert torch.equal(torchslim.load_model(out, plugins)(inputs), report.model(inputs))


def test_timing_waits_settle_seconds_after_each_timed_call(finished: tuple[Any, Path]) -> None:
    """Settles: after each timed call of the deployed model, the timing loop waited settle_seconds."""
    calls = finished[0].model.calls
    batch = FAST_METRICS["batch_size"]
    # The row's latency: the first calls at the latency batch (warm-up, then an untimed and a timed call per
    # run), followed by the evaluation; later ones are the end-of-run speed-up's.
    first = next(i for i, call in enumerate(calls) if call[0] == batch)
    last = next(i for i in range(first, len(calls)) if calls[i][0] != batch)
    gaps = [calls[i + 1][1] - calls[i][2] for i in range(first, last)]
    # Without the wait, these gaps last microseconds to milliseconds (a forward pass of this CNN: under 1 ms).
    assert sum(gap >= SETTLE for gap in gaps) >= RUNS, gaps


def test_runtime_stage_is_found_by_compare(finished: tuple[Any, Path], plugins: Registry) -> None:
    """RuntimeStage: compare's deploy_position finds it, and its rows name the installed runtime."""
    report, _ = finished
    recipe = validate(Document(hooks_recipe(), "recipe"), plugins)
    assert deploy_position(recipe) == 1
    assert report.rows[2].metrics["runtime"] == NumpyDeploy().installed_runtime() == f"numpy {np.__version__}"


def test_check_environment_fails_validate_with_the_stages_message(
    site: Path, tmp_path: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(AUTOLOAD_ENV)  # torchslim validate finds the plugin as an installed one
    fine = cli("validate", str(write_recipe(tmp_path, hooks_recipe(), "fine.yaml")))
    assert fine.returncode == 0, fine.stderr
    result = cli("validate", str(write_recipe(tmp_path, hooks_recipe(numpy_at_least="999.0"))))
    assert result.returncode == 2
    assert (
        f"stages[1] (numpy_deploy): stage numpy_deploy: numpy_at_least: numpy {np.__version__} is installed; "
        "this stage needs numpy >= 999.0"
    ) in result.stderr
