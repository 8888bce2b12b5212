"""What the engine asks of a model or a stage beyond ``apply``/``restore``: each hook a ``typing.Protocol``.

A plugin opts in by having the method or attribute (no base class to inherit); the engine checks with
``isinstance(obj, Hook)``. docs/plugins.md lists them for plugin authors, with an example of each;
tests/test_hooks.py has a plugin that uses every one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class CountsWeights(Protocol):
    """A module whose weights are neither parameters nor torch's packed quantized ones (an exported graph
    holding int8 constants, a packed low-bit layer): it lists them for the params / non-zero columns,
    and its submodules are not searched again."""

    def counted_weights(self) -> Iterable[torch.Tensor]:
        """The weight and bias tensors of the module (any dtype)."""
        ...


@runtime_checkable
class CountsMacs(Protocol):
    """A model whose multiply-accumulates torch's FLOP counter cannot see (it runs outside torch)."""

    def counted_macs(self, example: torch.Tensor) -> int | None:
        """MACs for one sample shaped like ``example``; None where they cannot be known (never a guessed 0)."""
        ...


@runtime_checkable
class Deployed(Protocol):
    """A model that runs in a runtime from files of its own: size is their bytes, and ``--out`` writes
    them beside ``model.pt`` with ``deploy.json``."""

    def file_bytes(self) -> int:
        """Bytes of the files the runtime loads."""
        ...

    def deploy_files(self) -> Mapping[str, bytes]:
        """``{file name: content}`` to write under ``--out`` (``model.onnx``, or ``model.xml`` + ``model.bin``)."""
        ...

    def deploy_info(self) -> dict[str, Any]:
        """The description of those files written as ``deploy.json`` (runtime, version, inputs, outputs, ...)."""
        ...


@runtime_checkable
class Settles(Protocol):
    """A model whose runtime keeps threads spinning after a call: the timing loop waits this long, untimed,
    after each timed call, so that the next model timed is not charged for them."""

    settle_seconds: float


@runtime_checkable
class RuntimeStage(Protocol):
    """A stage after which the model runs in a runtime (``deploy``): ``torchslim compare`` measures the
    original model through the same stage, as the variants' float baseline in that runtime."""

    runtime: str

    def installed_runtime(self) -> str | None:
        """The runtime and its installed version as rows name it (``openvino 2026.4.1``); None if it does not import."""
        ...


@runtime_checkable
class PerUnit(Protocol):
    """A stage whose setting can differ per layer, or per group of coupled layers (``unit_kind``): it names
    its units on a model and gives the stage that compresses one unit alone. ``torchslim sensitivity``
    measures each unit at a few settings with it, and a search's ``per_layer`` / ``per_group`` space sets
    ``{unit: setting}`` into the option named ``unit_option``."""

    unit_kind: str
    """``layer`` (one setting per layer) or ``group`` (per group of coupled channels)."""
    unit_setting: str
    """What a unit's setting is: ``bits`` (fewer is smaller) or ``amount`` (the fraction removed)."""
    unit_option: str
    """The stage option holding ``{unit: setting}`` (``layer_bits``, ``group_amounts``)."""

    def units(self, model: Any, example: torch.Tensor) -> list[str]:
        """The units of ``model`` this stage would compress (``example``: a batch of its inputs)."""
        ...

    def uniform_setting(self) -> float:
        """The setting the stage gives every unit as written (its ``bits``, its ``amount``)."""
        ...

    def alone(self, unit: str, setting: float, units: Any) -> Any:
        """A copy of this stage that compresses ``unit`` alone at ``setting`` (``units``: all of them)."""
        ...


# torch's own layer interfaces, which the engine reads on any module: a plugin's layer that offers them is
# measured as torch's layers are (the built-in low-bit layers do).


@runtime_checkable
class LinearShaped(Protocol):
    """A layer computing a Linear's product, with torch's attribute names: where torch's FLOP counter sees
    none of its work (a packed kernel, one outside torch), its MACs are output elements x ``in_features``."""

    in_features: int
    out_features: int


@runtime_checkable
class ConvShaped(Protocol):
    """A layer computing a convolution, with torch's attribute names: where the FLOP counter sees none of its
    work, its MACs are output elements x ``in_channels / groups`` x the kernel's elements."""

    in_channels: int
    groups: int
    kernel_size: int | tuple[int, ...]


@runtime_checkable
class PackedWeight(Protocol):
    """A layer without parameters of its own that keeps its weight packed (torch.ao's quantized Linear and
    Conv, the built-in low-bit layers): ``weight()`` returns it as a tensor (a quantized one is dequantized),
    ``bias`` is a tensor, a method returning one, or None. The params and non-zero columns count them."""

    def weight(self) -> torch.Tensor:
        """The layer's weight as a tensor."""
        ...


@runtime_checkable
class PackedRecurrent(Protocol):
    """A recurrent layer without parameters of its own (torch.ao's dynamic LSTM, GRU and cells): its packed
    weights and biases by name, counted like :class:`PackedWeight`'s."""

    def get_weight(self) -> Mapping[str, torch.Tensor]:
        """``{name: weight}``."""
        ...

    def get_bias(self) -> Mapping[str, torch.Tensor]:
        """``{name: bias}``."""
        ...


def settle_seconds(model: object) -> float:
    """:class:`Settles`'s wait for ``model``, 0 for any other."""
    return float(model.settle_seconds) if isinstance(model, Settles) else 0.0
