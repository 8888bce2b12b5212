"""The optional runtimes: imported only where used, with an install hint naming the extra when missing."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType

#: Per runtime: the modules it needs and the extra that installs them.
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "onnx": (("onnx",), "onnx"),
    "onnxruntime": (("onnx", "onnxruntime"), "onnx"),
    "openvino": (("onnx", "openvino"), "openvino"),
    "onnxruntime.quantization": (("onnx", "onnxruntime", "onnxruntime.quantization"), "onnx"),
    "nncf": (("openvino", "nncf"), "openvino"),
    "export": (("onnx", "onnxscript"), "onnx"),
}


class MissingExtra(ImportError):
    """An optional package a stage needs does not import; the message says which extra installs it."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra``."""
    return f"pip install 'torchslim[{extra}]'"


def require(what: str, extra: str | None = None) -> ModuleType:
    """Import every module ``what`` needs (a key of :data:`EXTRAS`) and return the last one.

    MissingExtra names the module that failed and the extra to install: ``extra`` where the caller
    knows which one the user chose (every runtime's extra brings the exporter), else ``what``'s own.
    """
    modules, own = EXTRAS[what]
    extra = extra or own
    module = None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # a module set to None in sys.modules raises ImportError too
            raise MissingExtra(
                f"{what} needs the Python package '{name}', which does not import ({exc}); install it with {install_hint(extra)}"
            ) from None
    assert module is not None  # EXTRAS lists at least one module per key
    return module


def require_runtime(runtime: str) -> None:
    """Import the exporter's packages and ``runtime``'s (``onnxruntime`` or ``openvino``); MissingExtra names
    the runtime's extra, which installs the exporter too (an OpenVINO user needs ``torchslim[openvino]``)."""
    extra = EXTRAS[runtime][1]
    require("export", extra)
    require(runtime, extra)


def version(module: str) -> str:
    """The installed version of ``module`` (its ``__version__``, without a build suffix: ``2026.4.1``)."""
    return str(getattr(importlib.import_module(module), "__version__", "unknown")).split("-")[0]


@contextlib.contextmanager
def quiet(loggers: Sequence[str], stdout: bool = False, silence_warnings: bool = False) -> Iterator[None]:
    """Keep a library's progress lines and advice off the terminal, where torchslim prints its own: the
    named loggers (``""``: the root) at ERROR, with ``stdout`` what it prints there, with
    ``silence_warnings`` its warnings; all restored after. A failure still raises."""
    named = [logging.getLogger(name or None) for name in loggers]
    levels = [logger.level for logger in named]
    for logger in named:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) if stdout else contextlib.nullcontext():
            if silence_warnings:
                warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(named, levels, strict=True):
            logger.setLevel(level)
