"""What the quantize methods of a runtime share (``ort_static``, ``ort_dynamic``, ``nncf``): they take a
model deployed by a ``deploy`` stage and quantize it in the runtime's own format, with its own library."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from .._calibration import calibration_inputs
from ..deploy import quiet
from ._backends import Census
from .base import QuantizeStage


class RuntimeQuantize(QuantizeStage):
    """A quantize method that runs inside a runtime: refuses any model but one deployed there."""

    runtime: ClassVar[str] = ""
    """The runtime whose deployed models this method quantizes (``deploy``'s ``runtime`` option)."""
    requires: ClassVar[str] = ""
    """The key of :data:`~torchslim.plugins.deploy.extras.EXTRAS` this method imports."""

    def check_environment(self) -> None:
        """Import the runtime's quantization library now (``torchslim validate`` asks)."""
        from ..deploy import MissingExtra, require

        try:
            require(self.requires)
        except MissingExtra as exc:
            raise StageError(self.label, f"method {self.method}: {exc}") from None

    def _check_targets(self, model: nn.Module) -> None:
        from ..deploy import RuntimeModel

        if not isinstance(model, RuntimeModel) or model.runtime != self.runtime:
            found = f"a model deployed to {model.runtime}" if isinstance(model, RuntimeModel) else "a torch model"
            raise StageError(
                self.label,
                f"method {self.method} quantizes a model deployed to {self.runtime}, found "
                f"{found}: put {{type: deploy, runtime: {self.runtime}}} before this stage",
            )
        self.check_environment()

    def _restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        from ..deploy import from_record

        return from_record(record)

    def _report(self, deployed: nn.Module, ctx: Context) -> None:
        """Name the runtime this row is measured in."""
        from ..deploy import runtime_label

        ctx.add_metric("runtime", runtime_label(deployed))  # type: ignore[arg-type]


def quiet_library() -> contextlib.AbstractContextManager[None]:
    """Keep the quantization libraries' advice and progress bars off the terminal: ONNX Runtime logs
    warnings on the root logger, NNCF draws progress on stdout, where torchslim prints only its table."""
    return quiet(["", "nncf"], stdout=True)


def calibration_arrays(ctx: Context, batches: int) -> list[np.ndarray]:
    """The inputs of the first ``batches`` calibration batches as numpy arrays: floats as float32, token ids
    kept integers (the exported graph's input type)."""
    return [_as_array(batch) for batch in calibration_inputs(ctx, batches)]


def _as_array(batch: torch.Tensor) -> np.ndarray:
    batch = batch.detach().cpu()
    array: np.ndarray = (batch.float() if batch.is_floating_point() else batch).contiguous().numpy()
    return array


def census_of(layers: Iterator[tuple[str, str, bool]]) -> Census:
    """A census from ``(name, type, quantized)`` triples."""
    census = Census()
    for name, kind, quantized in layers:
        (census.quantized if quantized else census.left_float)[name] = kind
    return census
