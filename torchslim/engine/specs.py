"""Recipe parts that name user code: ``module:callable`` targets for models and data."""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import nn

from .errors import CheckpointError, RecipeError, first_line, plain_text
from .usercode import call_target, importable
from .words import close_name

TARGET_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"

_WEIGHTS_WILL_LOAD = contextvars.ContextVar("torchslim_weights_will_load", default=False)


def weights_will_load() -> bool:
    """True while torchslim calls a model factory only to load saved weights over what it returns.

    That is the case in :func:`torchslim.load_model`, in ``--resume``, in the reload check of
    ``--out``, and when the model spec has a ``checkpoint``. A factory that trains (as the bundled
    ``torchslim.examples.digits`` ones do) can skip its training then: every weight is replaced.
    """
    return _WEIGHTS_WILL_LOAD.get()


@contextmanager
def loading_weights() -> Iterator[None]:
    """Within the block, :func:`weights_will_load` is True."""
    token = _WEIGHTS_WILL_LOAD.set(True)
    try:
        yield
    finally:
        _WEIGHTS_WILL_LOAD.reset(token)


def target_problem(value: str, expected: str = "'module:callable', e.g. mynet:build", names: tuple[str, ...] = ()) -> str | None:
    """Why ``value`` is neither a ``module:callable`` target nor one of ``names``: a plain sentence
    with the expected form, an example and a guess; None if it is fine."""
    if value in names or re.match(TARGET_PATTERN, value):
        return None
    # A short prefix ("acc") is too far from "accuracy" for difflib alone.
    close = [n for n in names if value and n.startswith(value.lower())] or difflib.get_close_matches(value, list(names), n=1)
    guess = close[0] if close else target_guess(value)
    hint = f"; did you mean '{guess}'?" if guess else ""
    return f"expected {expected}, found '{value}'{hint}"


def target_guess(value: str) -> str | None:
    """The ``module:callable`` a mistyped target probably meant (``pkg.mod.func`` -> ``pkg.mod:func``), or None."""
    # The usual slips: a dotted path without the colon, a file path, a trailing "()".
    text = value.strip().removesuffix("()").replace(".py:", ":").replace("/", ".")
    if ":" not in text and "." in text:
        text = ":".join(text.rsplit(".", 1))
    return text if text != value and re.match(TARGET_PATTERN, text) else None


def _check_target(value: str) -> str:
    problem = target_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Target = Annotated[str, AfterValidator(_check_target), Field(json_schema_extra={"pattern": TARGET_PATTERN})]
"""A ``module:callable`` string; a mistake is answered in words, with an example and a guess."""


class Spec(BaseModel):
    """Base of the recipe's parts: unknown keys are errors, values cannot change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSpec(Spec):
    """Where the model comes from."""

    target: Target
    """A ``module:callable`` returning an ``nn.Module``, e.g. ``torchslim.examples.digits:mlp``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the callable."""
    checkpoint: str | None = None
    """Optional state_dict file (relative to the recipe), loaded with ``weights_only=True``."""


class DataSpec(Spec):
    """Where the data comes from."""

    target: Target
    """A ``module:callable`` returning a mapping with ``train``, ``eval`` and optionally
    ``calibration`` and ``validation`` iterables of ``(inputs, targets)`` batches (``validation``:
    held-out data that stages choose on, so that ``eval`` only reports)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the callable."""


def import_target(target: str, field: str) -> Callable[..., Any]:
    """Import ``module:attr`` and return the attribute; RecipeError naming ``field`` on failure."""
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a recipe problem
        problem = f"{type(exc).__name__}: {exc}{_search_hint(exc, target)}"
        raise RecipeError(f"{field}: cannot import module '{module_name}': {problem}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            known = [name for name in dir(obj) if not name.startswith("_")]
            raise RecipeError(f"{field}: module '{module_name}' has no attribute '{attr_path}'{close_name(part, known)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"{field}: '{target}' is not callable")
    return obj  # type: ignore[no-any-return]


def resolved_kwargs(target: str, kwargs: Mapping[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """``kwargs`` with the factory's defaults filled in: ``{hidden: 32}`` and ``{}`` are the same call when
    ``hidden`` defaults to 32. As given where the target does not import or the kwargs do not bind (the run
    itself reports that)."""
    try:
        with importable(base_dir):
            signature = inspect.signature(import_target(target, "target"))
        bound = signature.bind(**kwargs)
    except (RecipeError, TypeError, ValueError):
        return dict(kwargs)
    bound.apply_defaults()
    resolved = dict(bound.arguments)
    for name, parameter in signature.parameters.items():  # **options: its keys, not one argument named options
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            resolved.update(resolved.pop(name, {}))
    return resolved


def _search_hint(exc: Exception, target: str) -> str:
    if not isinstance(exc, ModuleNotFoundError):
        return ""
    guess = target_guess(target)
    if guess:  # "mynet.py:build" is a well-formed target, but a file name, not a module
        return f"; did you mean '{guess}'?"
    return (
        "; a module next to the recipe file is found (torchslim puts the recipe's directory on sys.path), "
        "others must be installed or on PYTHONPATH"
    )


def build_model(spec: ModelSpec, base_dir: Path | None, field: str = "model") -> nn.Module:
    """Call the model factory and load its checkpoint, if any; the factory's failures are UserCodeErrors."""
    factory = import_target(spec.target, f"{field}.target")
    # A checkpoint replaces every weight the factory sets: it may skip its own training.
    with loading_weights() if spec.checkpoint is not None else contextlib.nullcontext():
        model = call_target(factory, spec.target, spec.kwargs, field)
    if not isinstance(model, nn.Module):
        raise RecipeError(f"{field}.target: '{spec.target}' returned {type(model).__name__}, expected an nn.Module")
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        load_state(model, safe_load(path), str(path))
    return model


#: How torch's weights_only refusal introduces the reason (torch 2.6 to 2.13).
_UNPICKLER = "WeightsUnpickler error:"


def safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: a pickle that would run code is refused."""
    try:
        with warnings.catch_warnings():
            # Loading quantized tensors goes through torch's deprecated TypedStorage and
            # quantized-tensor constructors; the warnings are torch's internals, not the user's.
            warnings.filterwarnings("ignore", message=".*(TypedStorage|quantized tensor creation).*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... on unsafe or bad files
        # torch's full message stays as the cause (the log's traceback shows it); the error says what it refused.
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor checkpoint loadable with weights_only=True ({_refusal(exc)})"
        ) from exc


def _refusal(exc: Exception) -> str:
    """What torch's refusal says the file holds: its weights_only message opens with advice on loading it
    anyway (unsafe here) and names the offending object on a later ``WeightsUnpickler error:`` line."""
    for line in plain_text(str(exc)).splitlines():
        if line.strip().startswith(_UNPICKLER):
            reason = line.strip().removeprefix(_UNPICKLER).strip()
            return reason.split(". ")[0]  # its next sentence advises allowlisting the object
    return first_line(exc) or type(exc).__name__


def load_state(model: nn.Module, state: Any, source: str) -> None:
    """Load a state dict (or ``{"state_dict": ...}``) into ``model``, strictly."""
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected a state_dict mapping, found {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: does not fit the model: {exc}") from None


def build_data(spec: DataSpec) -> dict[str, Any]:
    """Call the data factory; check it returned ``train`` and ``eval`` (``calibration`` defaults to ``train``;
    an optional ``validation`` loader is kept, and refused when it is the eval loader itself)."""
    factory = import_target(spec.target, "data.target")
    loaders = call_target(factory, spec.target, spec.kwargs, "data")
    if not isinstance(loaders, Mapping):
        raise RecipeError(f"data.target: '{spec.target}' returned {type(loaders).__name__}, expected a mapping")
    missing = [key for key in ("train", "eval") if key not in loaders]
    if missing:
        raise RecipeError(f"data.target: '{spec.target}' returned no {', '.join(missing)} loader (keys: {sorted(loaders)})")
    data = dict(loaders)
    data.setdefault("calibration", data["train"])
    if data.get("validation") is not None and data["validation"] is data["eval"]:
        # Choosing on the very data that reports would make the report optimistic while claiming not to.
        raise RecipeError(
            f"data.target: '{spec.target}' returned the eval loader as its validation loader; "
            "give held-out data that is not the eval data, or no validation key"
        )
    if "validation" in data and data["validation"] is None:
        del data["validation"]
    return data
