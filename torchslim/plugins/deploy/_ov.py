"""OpenVINO as a deployment target: the IR (model.xml + model.bin) in a :class:`RuntimeModel`."""

from __future__ import annotations

import ctypes
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .extras import require
from .runtime import RuntimeModel, is_weight

#: Float models run in float32: OpenVINO's CPU plugin would otherwise pick bf16 on CPUs that have it,
#: and the parity with torch (and the float row's accuracy) would measure that cast instead.
PRECISION = {"INFERENCE_PRECISION_HINT": "f32"}


class OpenVinoModel(RuntimeModel):
    """An OpenVINO IR model run by OpenVINO's CPU plugin."""

    runtime: ClassVar[str] = "openvino"
    suffixes: ClassVar[dict[str, str]] = {"xml": "model.xml", "bin": "model.bin"}

    def ov_model(self, shape: tuple[int, ...] | None = None) -> Any:
        """The IR as an ``openvino.Model`` (read from the buffers), its input reshaped to ``shape`` if given."""
        ov = require("openvino")
        weights = ov.Tensor(self.get_buffer("bin").cpu().numpy().copy())
        model = ov.Core().read_model(self.file("xml").decode(), weights)
        if shape is not None:
            model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
        return model

    def _open(self, threads: int, shape: tuple[int, ...] | None) -> Any:
        return Session(self._compile(threads, shape))

    def _compile(self, threads: int, shape: tuple[int, ...] | None) -> Any:
        """The IR compiled for the CPU with ``threads`` threads, one stream, float32 (for inputs of ``shape``)."""
        return compiled(self.ov_model(shape), {**PRECISION, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})

    def _run(self, session: Any, array: np.ndarray) -> list[np.ndarray]:
        return session(array)  # type: ignore[no-any-return]

    def _constants(self) -> Iterator[np.ndarray]:
        for op in self.ov_model().get_ops():
            if op.get_type_name() == "Constant":
                array = op.get_data()
                if is_weight(array):
                    yield array


class Session:
    """A compiled model and one infer request of it, reused call after call.

    ``compiled_model(array)`` reuses a request too, but returns its outputs in a dict keyed by output ports,
    which the caller then looks up port by port: at batch 1 on a small CNN that was a few microseconds of
    a call of tens (bench/overhead_bench.py). Here a model compiled for one input shape gets its input copied
    into the request's own buffer (measured faster than wrapping the array in a tensor, even for 32 MNIST
    images), one of dynamic shape gets the array itself, and each output is copied out of the request's
    buffer, which the next call overwrites. Inputs of another type are cast to the model's, as
    ``compiled_model(array)`` casts them."""

    __slots__ = ("_buffer", "_dtype", "_tensor", "compiled", "outputs", "request")

    def __init__(self, compiled_model: Any) -> None:
        self.compiled = compiled_model
        """The ``openvino.CompiledModel``."""
        self.request = compiled_model.create_infer_request()
        self.outputs = range(len(compiled_model.outputs))
        self._tensor = require("openvino").Tensor
        port = compiled_model.inputs[0]
        self._dtype = port.get_element_type().to_dtype()
        self._buffer: np.ndarray | None = self.request.get_input_tensor(0).data if port.get_partial_shape().is_static else None

    def __call__(self, array: np.ndarray) -> list[np.ndarray]:
        """The outputs of one inference on ``array`` (C-contiguous), as arrays of their own."""
        request, buffer = self.request, self._buffer
        if buffer is not None and array.shape == buffer.shape:
            buffer[...] = array
        else:
            # From here on the request reads the caller's array: its old buffer must never be written again.
            self._buffer = None
            request.set_input_tensor(self._tensor(array.astype(self._dtype, copy=False), shared_memory=True))
        request.infer()
        return [request.get_output_tensor(index).data.copy() for index in self.outputs]


def compiled(model: Any, config: Mapping[str, Any]) -> Any:
    """``model`` (an ``openvino.Model``) compiled for OpenVINO's CPU plugin with ``config``, the calling
    thread's alternate signal stack left as it was (:func:`kept_signal_stack`)."""
    ov = require("openvino")
    with kept_signal_stack():
        return ov.Core().compile_model(model, "CPU", dict(config))


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t`` (the field order differs on other systems)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Put the calling thread's alternate signal stack back as it was on leaving (Linux; elsewhere nothing).

    OpenVINO's CPU plugin (2026.4) gives the thread that compiles a model an alternate signal stack of its
    own, and when that compiled model is destroyed puts back the one it found and frees its own. Compiled
    models destroyed in another order than they were made (a RuntimeModel's sessions, models the garbage
    collector drops) left the thread on a freed stack, and the next signal Python handles there, which it
    handles on that stack (Ctrl-C; structured pruning's ``time_limit`` alarm), crashed the process with
    SIGSEGV (measured). With the stack put back after each compile, what each compiled model puts back is
    a stack that is still there."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    if libc is None:
        yield
        return
    saved = _SignalStack()
    libc.sigaltstack(None, ctypes.byref(saved))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


def ir_files(model: Any) -> dict[str, bytes]:
    """``{"xml": ..., "bin": ...}`` of an ``openvino.Model``, weights kept in their own precision
    (``save_model`` would otherwise compress float32 weights to float16)."""
    ov = require("openvino")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.xml"
        ov.save_model(model, str(path), compress_to_fp16=False)
        return {"xml": path.read_bytes(), "bin": path.with_suffix(".bin").read_bytes()}


def convert(model: Any, example: Any, dims: tuple[int, ...]) -> OpenVinoModel:
    """``model`` converted by OpenVINO's PyTorch frontend (``ov.convert_model``, traced on ``example``), the
    input's axes ``dims`` dynamic and the others fixed; input and output named ``input`` and ``output``."""
    ov = require("openvino")
    converted = ov.convert_model(model, example_input=example)
    shape = [-1 if d in dims else int(n) for d, n in enumerate(example.shape)]
    converted.reshape({converted.inputs[0]: ov.PartialShape(shape)})
    converted.inputs[0].get_tensor().set_names({"input"})
    converted.outputs[0].get_tensor().set_names({"output"})
    info = {
        "inputs": {"input": _named(converted.inputs[0], dims)},
        "outputs": {"output": _named(converted.outputs[0], (0,))},
        "opset": None,
    }
    return OpenVinoModel(ir_files(converted), info)


def _named(port: Any, dims: tuple[int, ...]) -> list[Any]:
    """A port's shape as deploy.json writes it: a dynamic axis by its name (``batch``, ``sequence``)."""
    from .export import axis_name

    return [axis_name(d) if dim.is_dynamic else dim.get_length() for d, dim in enumerate(port.get_partial_shape())]


def from_onnx(onnx_bytes: bytes, info: dict[str, Any]) -> OpenVinoModel:
    """The ONNX model converted to OpenVINO's IR."""
    ov = require("openvino")
    return OpenVinoModel(ir_files(ov.Core().read_model(onnx_bytes)), info)
