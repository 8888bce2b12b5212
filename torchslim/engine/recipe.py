"""The recipe: Pydantic models, built over the registry's stage classes, and loading with positions."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)

from .errors import PluginError, RecipeError
from .registry import Registry
from .specs import TARGET_PATTERN, DataSpec, ModelSpec, Spec
from .stage import Stage
from .study_fields import Constraints, SweepMode, SweepValues, check_sweep, check_zip
from .yamlio import Document, read_yaml


class EvaluateSpec(Spec):
    """How the model is scored after every stage."""

    metric: str = Field(default="accuracy", pattern=rf"^accuracy$|{TARGET_PATTERN}")
    """``accuracy`` (percent of eval samples whose argmax is the label), or a ``module:callable``
    taking ``(model, loader)`` and returning a float."""
    name: str | None = None
    """Column name of the metric in reports (defaults to ``accuracy`` or the callable's name)."""

    @property
    def label(self) -> str:
        """The metric's name in reports."""
        return self.name or self.metric.rpartition(":")[2].rpartition(".")[2]


class MetricsOptions(Spec):
    """How models are measured after every stage."""

    collect: bool = True
    """Measure size, sparsity, MACs and latency after every stage; off, only the task metric and time."""
    latency: bool = True
    """Measure latency (turn off to save time)."""
    batch_size: int = Field(default=32, ge=1)
    """Batch size of the latency measurement."""
    warmup: int = Field(default=5, ge=0)
    """Untimed forward passes before timing."""
    runs: int = Field(default=30, ge=1)
    """Timed forward passes; the median is reported."""
    threads: int | None = Field(default=2, ge=1)
    """torch threads while timing (fixed so that figures compare); null leaves torch's setting."""


class RecipeBase(BaseModel):
    """Fields common to every recipe; :func:`recipe_model` adds ``stages`` over a registry."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """Name of the recipe, used in reports."""
    seed: int = 0
    """Seed for torch's generators, set before the model, the data and each stage."""
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    """Where the model runs and trains: ``cpu``, ``cuda`` or ``cuda:N`` (quantized models always run on the CPU)."""
    model: ModelSpec
    """The model to compress."""
    data: DataSpec
    """The data: train, calibration and eval loaders."""
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    """The task metric."""
    metrics: MetricsOptions = Field(default_factory=MetricsOptions)
    """Measurement options."""
    stages: list[Stage] = Field(min_length=1)
    """Compression stages, applied in order (narrowed to the registered types by recipe_model)."""
    # The comparison fields are left out of resolved(): a variant's saved recipe and hash hold what ran.
    sweep: SweepValues | None = Field(default=None, exclude=True)
    """For ``torchslim compare`` only: dotted paths to lists of values, e.g. ``{stages.0.amount: [0.3, 0.5]}``;
    each combination is run as one variant, named after its values."""
    sweep_mode: SweepMode = Field(default="grid", exclude=True)
    """``grid``: every combination of the sweep's values; ``zip``: the i-th values of every path together."""
    constraints: Constraints | None = Field(default=None, exclude=True)
    """For ``torchslim compare``: the budget each variant passes or fails; the best passing one is named."""

    _document: Document | None = PrivateAttr(default=None)

    @field_validator("sweep")
    @classmethod
    def _sweep_paths(cls, value: SweepValues | None) -> SweepValues | None:
        return check_sweep(value)

    @field_validator("sweep_mode")
    @classmethod
    def _zip_lengths(cls, value: SweepMode, info: ValidationInfo) -> SweepMode:
        return check_zip(value, info.data.get("sweep"))

    @property
    def document(self) -> Document | None:
        """The parsed YAML this recipe was validated from (None for one built in Python)."""
        return self._document

    def rebound(self, document: Document, update: dict[str, Any]) -> RecipeBase:
        """A copy with ``update`` applied and ``document`` as its source, without validating again:
        only for updates valid by construction that no other field's validation depends on."""
        copied = self.model_copy(update=update)
        copied._document = document
        return copied

    @property
    def base_dir(self) -> Path | None:
        """Directory of the recipe file, against which relative paths are resolved."""
        if self._document is None or self._document.source.startswith("<"):
            return None
        return Path(self._document.source).resolve().parent

    @property
    def stage_list(self) -> list[Stage]:
        """The validated stages, in order."""
        return list(self.stages)

    def where(self, path: tuple[Any, ...]) -> str:
        """``file:line:col`` of a field, for messages about problems found after validation."""
        return self._document.where(path) if self._document else "<recipe>"

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in, as plain data."""
        return self.model_dump(mode="json")


_MODELS: dict[tuple[type[Stage], ...], type[RecipeBase]] = {}


def recipe_model(registry: Registry) -> type[RecipeBase]:
    """The Recipe class whose ``stages`` are a discriminated union of the registry's stage classes
    (a family's member is itself a union of its method classes, discriminated by ``method``)."""
    classes = tuple(registry.stage_classes())
    if classes not in _MODELS:
        members = tuple(_member(cls) for cls in classes)
        union: Any = Annotated[Union[members], Field(discriminator="type")]  # noqa: UP007 (built at run time)
        _MODELS[classes] = create_model(
            "Recipe",
            __base__=RecipeBase,
            stages=(list[union], Field(min_length=1, description="Compression stages, applied in order.")),
        )
    return _MODELS[classes]


def tag_of(cls: type[Stage], field: str) -> str:
    """The literal default of a stage class's ``type`` or ``method`` field."""
    return str(cls.model_fields[field].default)


def _member(cls: type[Stage]) -> Any:
    if not cls.methods:
        return cls
    methods = tuple(Annotated[m, Tag(tag_of(m, "method"))] for m in cls.methods)
    return Annotated[Union[methods], Discriminator(_tag_reader("method", cls.default_method))]  # noqa: UP007


def _tag_reader(field: str, default: str | None) -> Any:
    # A callable discriminator, so that a family's method can have a default (a string
    # discriminator requires the key in the data).
    def tag(value: Any) -> str | None:
        found = value.get(field, default) if isinstance(value, Mapping) else getattr(value, field, default)
        return found if isinstance(found, str) or found is None else repr(found)

    tag.__name__ = field
    return tag


def load_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any] | RecipeBase, registry: Registry | None = None
) -> RecipeBase:
    """Read and validate a recipe from a YAML path, a mapping, or return a validated one as is."""
    if isinstance(source, RecipeBase):
        return source
    registry = registry or Registry.load()
    document = Document(dict(source), "<recipe>") if isinstance(source, Mapping) else read_yaml(source)
    return validate(document, registry)


def validate(document: Document, registry: Registry) -> RecipeBase:
    """Validate parsed YAML against the recipe model; RecipeError with positions on failure."""
    if not isinstance(document.data, Mapping):
        raise RecipeError(f"{document.where(())}: expected a mapping of recipe fields, found {type(document.data).__name__}")
    model = recipe_model(registry)
    try:
        recipe = model.model_validate(document.data)
    except ValidationError as exc:
        raise RecipeError(_problems(document, exc, registry)) from None
    recipe._document = document
    return recipe


def _problems(document: Document, exc: ValidationError, registry: Registry) -> list[str]:
    # A value that fits no member of a union (teacher: "original" or a model spec) gives one
    # error per member at the same path: merge them into one line.
    merged: dict[str, list[str]] = {}
    for err in exc.errors():
        where, message = _problem(document, err, registry)
        if message not in merged.setdefault(where, []):
            merged[where].append(message)
    return [f"{where}: {'; or '.join(messages)}" for where, messages in merged.items()]


def _problem(document: Document, err: Any, registry: Registry) -> tuple[str, str]:
    path = _data_path(document.data, err["loc"], keep_last=err["type"] in ("missing", "extra_forbidden"))
    stage_type = _stage_type(document.data, path)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid" and err["ctx"]["discriminator"] == "method()":
        message = _method_message(registry, stage_type, str(err["ctx"]["tag"]))
        path = path + ("method",)
    elif err["type"] == "union_tag_invalid":
        message = registry.unknown_message(str(err["ctx"]["tag"]))
        path = path + ("type",)
    elif err["type"] == "union_tag_not_found":
        message = f"missing 'type'; known types: {', '.join(registry.types())}"
    elif err["type"] == "extra_forbidden":
        message = _extra_message(document.data, path, registry)
    elif err["type"] == "missing":
        message = f"required field '{path[-1]}' is missing" if path else message
    label = format_path(path) + (f" ({stage_type})" if stage_type else "")
    return f"{document.where(path)}: {label or '<top level>'}", message


def _data_path(data: Any, loc: tuple[Any, ...], keep_last: bool) -> tuple[Any, ...]:
    # Pydantic inserts union members into loc ("stages", 2, "quantize", "dtype"); keep only
    # the steps that exist in the data, plus the final key of a missing or unknown field.
    path: list[Any] = []
    node = data
    for index, step in enumerate(loc):
        if _has_step(node, step):
            node = node[step]
        elif not (keep_last and index == len(loc) - 1):
            continue  # a union member, not a key of the data
        path.append(step)
    return tuple(path)


def _has_step(node: Any, step: Any) -> bool:
    if isinstance(node, Mapping):
        return step in node
    return isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)


def _stage_type(data: Any, path: tuple[Any, ...]) -> str | None:
    if len(path) >= 2 and path[0] == "stages" and isinstance(data, Mapping):
        stages = data.get("stages")
        if isinstance(stages, list) and isinstance(path[1], int) and path[1] < len(stages):
            stage = stages[path[1]]
            if isinstance(stage, Mapping) and isinstance(stage.get("type"), str):
                return str(stage["type"])
    return None


def _stage_class(data: Any, path: tuple[Any, ...], registry: Registry) -> type[Stage] | None:
    """The class validating the stage at ``path`` (for a family, the method's), if it is known."""
    stage_type = _stage_type(data, path)
    if stage_type is None:
        return None
    try:
        cls = registry.get(stage_type)
    except PluginError:
        return None
    if not cls.methods:
        return cls
    method = data["stages"][path[1]].get("method", cls.default_method)
    return next((m for m in cls.methods if tag_of(m, "method") == method), None)


def _extra_message(data: Any, path: tuple[Any, ...], registry: Registry) -> str:
    option = path[-1]
    cls = _stage_class(data, path, registry) if len(path) == 3 else None
    if cls is None:
        return f"unknown field '{option}'"
    family = registry.get(cls.model_fields["type"].default)
    owners = [tag_of(m, "method") for m in family.methods if option in m.model_fields]
    if owners:
        return (f"'{option}' does not apply to method {tag_of(cls, 'method')}; it is an option of method "
                f"{' and '.join(owners)}")
    return f"unknown field '{option}'; {_stage_type(data, path)} accepts: {', '.join(cls.model_fields)}"


def _method_message(registry: Registry, stage_type: str | None, tag: str) -> str:
    family = registry.get(stage_type) if stage_type else None
    tags = [repr(tag_of(m, "method")) for m in family.methods] if family else []
    known = f"{', '.join(tags[:-1])} or {tags[-1]}" if len(tags) > 1 else "".join(tags)
    return f"Input should be {known}"


def format_path(path: tuple[Any, ...]) -> str:
    """``("stages", 2, "amount")`` -> ``stages[2].amount``."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text
