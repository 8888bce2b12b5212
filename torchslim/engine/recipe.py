"""The recipe: Pydantic models, built over the registry's stage classes, and loading with positions."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union

import torch
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

from .errors import RecipeError
from .labels import check_names
from .problems import format_path, tag_of, validation_problems
from .registry import Registry
from .specs import TARGET_PATTERN, DataSpec, ModelSpec, Spec, target_problem
from .stage import Stage
from .study_fields import Constraints, SearchSpec, SweepMode, SweepValues, check_search, check_sweep, check_zip
from .timing import LATENCY_BATCH, LATENCY_THREADS
from .yamlio import Document, read_yaml

# format_path and tag_of moved to problems.py with the messages; importable from here as before.

__all__ = [
    "DataSpec",
    "EvaluateSpec",
    "MetricsOptions",
    "ModelSpec",
    "RecipeBase",
    "format_path",
    "load_recipe",
    "recipe_model",
    "tag_of",
    "validate",
]

DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?)$"


class EvaluateSpec(Spec):
    """How the model is scored after every stage."""

    metric: str = Field(default="accuracy", json_schema_extra={"pattern": rf"^accuracy$|{TARGET_PATTERN}"})
    """``accuracy`` (percent of eval samples whose argmax is the label), or a ``module:callable``
    taking ``(model, loader)`` and returning a float."""
    name: str | None = None
    """Column name of the metric in reports (defaults to ``accuracy`` or the callable's name)."""
    fraction: float = Field(default=1.0, gt=0, le=1)
    """Score on the first fraction of the eval (and validation) batches, at least one: a cheaper, noisier metric
    (``torchslim search``'s cheap trials set it); 1 scores them all."""

    @field_validator("metric")
    @classmethod
    def _metric_form(cls, value: str) -> str:
        problem = target_problem(
            value, "'accuracy' or a 'module:callable' taking (model, loader), e.g. mymetrics:f1", names=("accuracy",)
        )
        if problem:
            raise ValueError(problem)
        return value

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
    batch_size: int = Field(default=LATENCY_BATCH, ge=1)
    """Batch size of the latency measurement."""
    warmup: int = Field(default=5, ge=0)
    """Untimed forward passes before timing."""
    runs: int = Field(default=30, ge=1)
    """Timed forward passes; the median is reported."""
    threads: int | None = Field(default=LATENCY_THREADS, ge=1)
    """torch threads while timing (fixed so that figures compare); null leaves torch's setting."""
    reference: str | None = None
    """A folder torchslim saved a model in (``torchslim run --out``; a search's ``reference``): at the end of the
    run the final model is timed in turns with it, round by round, and the report gives the two medians and
    their ratio (``reference`` in report.json). Load on the machine slows both alike, so the ratio holds where
    one timing drifts. A relative path is taken from the recipe's directory."""


class RecipeBase(BaseModel):
    """Fields common to every recipe; :func:`recipe_model` adds ``stages`` over a registry."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = "recipe"
    """Name of the recipe, used in reports; defaults to the recipe file's name without ``.yaml``."""
    seed: int = 0
    """Seed for torch's generators, set before the model, the data and each stage."""
    device: str = Field(default="cpu", json_schema_extra={"pattern": DEVICE_PATTERN})
    """Where the model runs and trains: ``cpu``, ``cuda`` or ``cuda:N`` (quantized models always run on the CPU)."""
    threads: int | None = Field(default=None, ge=1)
    """torch threads for the work outside timing: building the model, training, calibration, evaluation
    (``metrics.threads`` applies while timing). null: as ``metrics.threads``, never more than torch's own
    setting (which ``OMP_NUM_THREADS``, torchrun and ``torchslim compare --jobs`` lower)."""
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
    """For ``torchslim compare`` and ``torchslim search``: the budget each variant passes or fails; the best
    passing one is named."""
    search: SearchSpec | None = Field(default=None, exclude=True)
    """For ``torchslim search``: the space of values to search, the objectives, the budget of trials or minutes."""

    _document: Document | None = PrivateAttr(default=None)

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        if re.match(DEVICE_PATTERN, value):
            return value
        guess = re.sub(r"^cuda(\d+)$", r"cuda:\1", value.strip().lower().replace("gpu", "cuda"))
        hint = f"; did you mean '{guess}'?" if guess != value and re.match(DEVICE_PATTERN, guess) else ""
        raise ValueError(f"expected cpu, cuda or cuda:N (a GPU by number, e.g. cuda:0), found '{value}'{hint}")

    @field_validator("sweep")
    @classmethod
    def _sweep_paths(cls, value: SweepValues | None) -> SweepValues | None:
        return check_sweep(value)

    @field_validator("sweep_mode")
    @classmethod
    def _zip_lengths(cls, value: SweepMode, info: ValidationInfo) -> SweepMode:
        return check_zip(value, info.data.get("sweep"))

    @field_validator("search")
    @classmethod
    def _search_or_sweep(cls, value: SearchSpec | None, info: ValidationInfo) -> SearchSpec | None:
        return check_search(value, info.data.get("sweep"))

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

    def work_threads(self) -> int:
        """The torch threads of the work outside timing: ``threads``, or by default ``metrics.threads``
        capped at torch's current setting (a machine, a torchrun or a ``--jobs`` share with fewer cores)."""
        current = torch.get_num_threads()
        if self.threads is not None:
            return self.threads
        return min(self.metrics.threads or current, current)

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


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any] | RecipeBase, registry: Registry | None = None) -> RecipeBase:
    """Read and validate a recipe from a YAML path, a mapping, or return a validated one as is."""
    if isinstance(source, RecipeBase):
        return source
    registry = registry or Registry.load()
    document = Document(dict(source), "<recipe>") if isinstance(source, Mapping) else read_yaml(source)
    return validate(document, registry)


def _named(document: Document) -> Mapping[str, Any]:
    """The recipe's fields, ``name`` defaulting to the file's stem (``my-study.yaml``: ``my-study``)."""
    if "name" in document.data or document.source.startswith("<"):
        return document.data  # type: ignore[no-any-return]
    return {"name": Path(document.source).stem, **document.data}


def validate(document: Document, registry: Registry) -> RecipeBase:
    """Validate parsed YAML against the recipe model; RecipeError with positions on failure."""
    if not isinstance(document.data, Mapping):
        raise RecipeError(f"{document.where(())}: expected a mapping of recipe fields, found {type(document.data).__name__}")
    model = recipe_model(registry)
    try:
        recipe = model.model_validate(_named(document))
    except ValidationError as exc:
        raise RecipeError(validation_problems(document, exc, registry, model)) from None
    recipe._document = document
    check_names(recipe)  # after the fields: it names the lines of both stages, which needs the document
    return recipe
