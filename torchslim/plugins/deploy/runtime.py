"""A deployed model as a torch module: the runtime's files held as uint8 buffers, run by the runtime.

The engine measures, checkpoints and reloads nn.Modules; :class:`RuntimeModel` is one whose forward
pass runs an ONNX Runtime or OpenVINO session. Its state dict is the deployable files themselves
(uint8 tensors: weights_only-safe, written with model.pt and read back by ``load_model``), so the
saved model is exactly what runs, and its size on disk is the files' bytes.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

#: How many distinct input shapes get a session of their own, compiled for that shape alone (``deploy``'s
#: ``static_shapes``; models saved before the option existed get it too: it changes how they run, not what).
STATIC_SHAPES = 4


class RuntimeModel(nn.Module):
    """An exported model run by a runtime, with the torch module interface the engine measures.

    ``files`` maps a file name (``onnx``, or ``xml`` and ``bin``) to its bytes; ``info`` is plain data
    (input and output names, the MACs counted in torch before export) recorded for ``restore``.
    Sessions are built lazily, one per thread count (torch's thread setting at call time, so the
    engine's ``metrics.threads`` governs the runtime too) and input shape: the first ``info["static_shapes"]``
    distinct shapes get a session compiled for that shape alone, later ones share the session of the
    dynamic axes. Sessions are dropped when new files are loaded.
    """

    runtime: ClassVar[str] = ""
    """The runtime's name, as a recipe's ``runtime`` option spells it."""
    suffixes: ClassVar[dict[str, str]] = {}
    """Buffer name -> the file written under ``--out`` (``{"onnx": "model.onnx"}``)."""
    settle_seconds: ClassVar[float] = 0.0
    """How long the runtime keeps a core busy after a run returns: the engine's interleaved timing waits
    this long (untimed) before timing the next model, so that model is not charged for it."""

    def __init__(self, files: Mapping[str, bytes | int], info: Mapping[str, Any]) -> None:
        super().__init__()
        self.info = dict(info)
        for name in self.suffixes:
            content = files[name]
            # An int is a size only: restore makes room, then load_state_dict fills in the bytes.
            data = torch.empty(content, dtype=torch.uint8) if isinstance(content, int) else _as_tensor(content)
            self.register_buffer(name, data)
        self._sessions: dict[tuple[int, tuple[int, ...] | None], Any] = {}
        self._weights: list[torch.Tensor] | None = None  # the graph's weights, parsed once per set of files
        self.register_load_state_dict_post_hook(_drop_sessions)

    def __getstate__(self) -> dict[str, Any]:
        # Runtime sessions cannot be copied or pickled; a copy builds its own on first use.
        return {**super().__getstate__(), "_sessions": {}, "_weights": None}

    def file(self, name: str) -> bytes:
        """The bytes of file ``name`` (a buffer)."""
        return self.get_buffer(name).cpu().numpy().tobytes()

    def file_bytes(self) -> int:
        """Size of the deployable files together: the size on disk of what runs."""
        return sum(self.get_buffer(name).numel() for name in self.suffixes)

    def deploy_files(self) -> dict[str, bytes]:
        """The files ``--out`` writes next to model.pt: ``{"model.onnx": ...}`` or ``model.xml`` + ``model.bin``."""
        return {file: self.file(name) for name, file in self.suffixes.items()}

    def restore_record(self) -> dict[str, Any]:
        """What :func:`from_record` needs to rebuild this module's shape (sizes, names), as plain data."""
        sizes = {name: self.get_buffer(name).numel() for name in self.suffixes}
        return {"runtime": self.runtime, "sizes": sizes, "info": dict(self.info)}

    def counted_macs(self, example: torch.Tensor) -> int | None:
        """MACs per sample, counted on the torch model before export (the graph computes the same products)."""
        macs = self.info.get("macs")
        return None if macs is None else int(macs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the runtime on ``inputs`` (one batch: floats, or token ids) and return its output(s) as torch tensors."""
        # The common case first, in one dict lookup: a shape that already has a session of its own. At batch 1
        # on a small model the runtime takes tens of microseconds, and every one spent here shows.
        session = self._sessions.get((torch.get_num_threads(), inputs.shape))
        if session is None:
            session = self._session(self._static_shape(tuple(inputs.shape)))
        return _tensors(self._run(session, _array(inputs)))

    def each_session(self, inputs: torch.Tensor) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
        """The outputs of every session that can run ``inputs``, by a description of the session: the one
        compiled for their shape (when the shape gets one) and the one of the dynamic axes. The parity check
        runs both: shapes beyond ``static_shapes`` run in the second."""
        shape = self._static_shape(tuple(inputs.shape))
        return {
            "the session of the dynamic axes" if key is None else f"the session compiled for shape {list(key)}": self._forward(
                inputs, key
            )
            for key in dict.fromkeys((shape, None))
        }

    def _forward(self, inputs: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return _tensors(self._run(self._session(shape), _array(inputs)))

    def _session(self, shape: tuple[int, ...] | None) -> Any:
        key = (torch.get_num_threads(), shape)
        if key not in self._sessions:
            self._sessions[key] = self._open(*key)
        return self._sessions[key]

    def _static_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """``shape`` if it has a session of its own (at some thread count) or there is room for one; None: the
        session of the dynamic axes."""
        fixed = {key[1] for key in self._sessions if key[1] is not None}
        room = len(fixed) < int(self.info.get("static_shapes", STATIC_SHAPES))
        return shape if shape in fixed or room else None

    def counted_weights(self) -> Iterator[torch.Tensor]:
        """The graph's weight constants (for params, non-zeros and the engine's "changed nothing" check).

        The engine counts them several times per row; parsing the files each time would copy and read the
        whole model again, so they are kept until new files are loaded."""
        if self._weights is None:
            self._weights = [torch.from_numpy(np.array(array, copy=True)) for array in self._constants()]
        yield from self._weights

    @abstractmethod
    def _open(self, threads: int, shape: tuple[int, ...] | None) -> Any:
        """A session (or compiled model) of the runtime using ``threads`` threads, for inputs of ``shape``
        only (the runtime plans memory and picks kernels for it) or, with None, of any shape the file allows."""

    @abstractmethod
    def _run(self, session: Any, array: np.ndarray) -> list[np.ndarray]:
        """The outputs of one forward pass on ``array`` (C-contiguous), as arrays of their own (not views of
        the runtime's buffers, which the next call overwrites): they become the output tensors without a copy."""

    @abstractmethod
    def _constants(self) -> Iterator[np.ndarray]:
        """The graph's weight constants, as numpy arrays."""

    def deploy_info(self) -> dict[str, Any]:
        """deploy.json: the runtime and its version, the files, inputs and outputs."""
        return {
            "runtime": self.runtime,
            "version": self.info.get("version"),
            "files": sorted(self.suffixes.values()),
            "inputs": self.info.get("inputs"),
            "outputs": self.info.get("outputs"),
            "opset": self.info.get("opset"),
        }


def runtime_label(model: RuntimeModel) -> str:
    """``onnxruntime 1.32.0``: the runtime a row was measured in, and its version."""
    return runtime_text(model.runtime, model.info.get("version"))


def runtime_text(runtime: str, version: str | None) -> str:
    """A runtime and its version as rows and reports name them (``openvino 2026.4.1``)."""
    return f"{runtime} {version or ''}".strip()


def _array(inputs: torch.Tensor) -> np.ndarray:
    """``inputs`` as a C-contiguous numpy array, sharing the tensor's memory where it can."""
    try:
        array = inputs.numpy()  # a CPU tensor outside autograd: no copy, and the fewest calls
    except RuntimeError:  # it requires grad, or lives on another device
        array = inputs.detach().cpu().numpy()
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _tensors(outputs: list[np.ndarray]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The runtime's output arrays as torch tensors (sharing their memory): one tensor, or a tuple of several."""
    if len(outputs) == 1:
        return torch.from_numpy(outputs[0])
    return tuple(torch.from_numpy(out) for out in outputs)


def _drop_sessions(module: RuntimeModel, _keys: Any) -> None:
    """After new files are loaded, the sessions and weights read from the old ones must go."""
    module._sessions.clear()
    module._weights = None


def _as_tensor(content: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(content), dtype=torch.uint8)


def is_weight(array: np.ndarray) -> bool:
    """A constant that holds weights: at least one dimension, a float or 8-bit type (not a shape or an index)."""
    return array.ndim >= 1 and array.size > 1 and array.dtype.kind in "fiu" and array.dtype != np.int64
