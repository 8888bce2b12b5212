"""Calling the recipe's own code: its directory importable, its failures named by the recipe field.

A factory or metric the user wrote can fail in any way. Those failures are the user's to fix, so
they become :class:`UserCodeError` naming the field (``model.kwargs.hiden``), the callable and
the exception; the user's traceback stays attached as ``__cause__`` (``--debug`` shows it).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserCodeError


@contextmanager
def importable(directory: Path | None) -> Iterator[None]:
    """Put ``directory`` (a recipe's) first on ``sys.path`` for the block, so that a ``mynet.py``
    next to the recipe imports as ``target: mynet:build`` without setting PYTHONPATH."""
    if directory is None:
        yield
        return
    entry = str(directory)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()  # the finders may have cached the directory as missing
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def call_target(factory: Callable[..., Any], target: str, kwargs: Mapping[str, Any], field: str) -> Any:
    """``factory(**kwargs)``; UserCodeError naming ``field`` if the kwargs do not fit or the call raises."""
    try:
        return factory(**kwargs)
    except Exception as exc:  # the user's code may raise anything: it is the user's error, not ours
        problem = kwargs_problem(factory, target, kwargs, field) if isinstance(exc, TypeError) else None
        if problem is not None:
            raise UserCodeError(problem[1], path=problem[0]) from exc
        raise UserCodeError(f"{field}.target: {target}() raised {type(exc).__name__}: {exc}", path=(field, "target")) from exc


def kwargs_problem(
    factory: Callable[..., Any], target: str, kwargs: Mapping[str, Any], field: str
) -> tuple[tuple[str, ...], str] | None:
    """Whether ``kwargs`` bind to ``factory``'s signature: None, or (recipe path, message) if not."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and some C callables have no signature to check
        return None
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        return _bind_message(signature, target, kwargs, field, str(exc))
    return None


def _bind_message(
    signature: inspect.Signature, target: str, kwargs: Mapping[str, Any], field: str, problem: str
) -> tuple[tuple[str, ...], str]:
    names = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = next((key for key in kwargs if key not in names), None)
    path: tuple[str, ...] = (field, "kwargs", unknown) if unknown else (field, "kwargs")
    close = difflib.get_close_matches(unknown, names, n=1) if unknown else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    label = ".".join(path)
    return path, f"{label}: {target}{signature} does not accept these kwargs: {problem}{hint}"
