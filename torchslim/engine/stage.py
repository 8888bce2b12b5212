"""The stage protocol: what a compression stage is, and what it may read and write."""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from torch import nn

from .timing import LATENCY_BATCH, LATENCY_THREADS

Batch = tuple[torch.Tensor, torch.Tensor]


class Stage(BaseModel, ABC):
    """A compression stage: its fields are its configuration, :meth:`apply` is its work.

    Subclasses narrow ``type`` to a literal tag, e.g. ``type: Literal["prune"] = "prune"``,
    and document each field with an attribute docstring (it becomes the schema's description).
    A config holds no runtime state; heavy imports belong inside :meth:`apply`.

    A stage *family* (the built-in ``prune`` and ``quantize``) is registered as an abstract base
    class holding the options its methods share, with one concrete subclass per method: each
    narrows ``method`` to a literal tag and is listed in the base's ``methods``; a recipe that
    names no method gets ``default_method``.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        json_schema_extra=lambda schema, cls: _method_required(schema, cls),
    )

    changes_model: ClassVar[bool] = True
    """False for a stage that inspects, exports, logs or checks and leaves the model as it was. The
    engine then shows its row as unchanged instead of failing; it still fails if the model did change.
    Every other stage must change the model: one that changed nothing is an error."""
    methods: ClassVar[tuple[type[Stage], ...]] = ()
    """A family's method classes (empty for a stage that is one method itself)."""
    default_method: ClassVar[str | None] = None
    """The method of a family used when a recipe names none."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        # A family lists its methods after they exist (Family.methods = (...)); a method class
        # must not inherit that list, or it would count as a family itself.
        if "methods" not in cls.__dict__:
            cls.methods = ()

    type: str
    """The stage type, as registered."""
    name: str | None = None
    """Label of this stage in the summary table (defaults to the type)."""

    @classmethod
    def from_options(cls, **options: Any) -> Stage:
        """A validated stage from its recipe options; for a family, an instance of the method class
        that ``options["method"]`` names (``default_method`` when absent)."""
        if not cls.methods:
            return cls.model_validate(options)
        method = options.get("method", cls.default_method)
        chosen = next((m for m in cls.methods if m.model_fields["method"].default == method), None)
        if chosen is None:
            known = ", ".join(str(m.model_fields["method"].default) for m in cls.methods)
            raise ValueError(f"unknown method {method!r} of {cls.__name__}; known: {known}")
        return chosen.model_validate(options)

    @property
    def label(self) -> str:
        """The name shown in reports."""
        return self.name or self.type

    @abstractmethod
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Compress ``model`` and return the model the engine continues with."""

    def check_environment(self) -> None:
        """Raise (StageError, naming what to install) if something this stage needs beyond torch is
        missing; ``torchslim validate`` calls it so that a recipe fails before anything runs. The
        default needs nothing."""

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Redo this stage's structural changes (module swaps, removed channels) on a fresh model.

        Used to load a saved model: the architecture is rebuilt from the recipe, each stage's
        structure replayed, then the saved tensors loaded. ``record`` is what :meth:`apply`
        recorded with :meth:`Context.record_for_restore` (e.g. which channels it kept). Stages
        that only change values keep this default, which changes nothing. With ``--out``, every
        checkpoint is rebuilt this way as soon as it is written, and a stage whose model cannot
        be rebuilt fails there.
        """
        return model


def _method_required(schema: dict[str, Any], cls: type) -> None:
    # In the JSON Schema, only a family's default method may omit `method`: otherwise an editor
    # finds a stage without it matching several members of the union.
    family = next((base for base in cls.__mro__[1:] if cls in getattr(base, "methods", ())), None)
    if family is not None and cls.model_fields["method"].default != family.default_method:  # type: ignore[attr-defined]
        schema.setdefault("required", []).append("method")


def option_errors(stage: BaseModel, problems: list[tuple[str, str]]) -> ValidationError:
    """One validation error per ``(option, message)``, located at the option, for a model validator
    to raise: a recipe error then points at the option at fault (file:line), not at the whole stage."""
    details = [
        InitErrorDetails(
            type=PydanticCustomError("value_error", "{reason}", {"reason": message}), loc=(option,), input=getattr(stage, option)
        )
        for option, message in problems
    ]
    return ValidationError.from_exception_data(type(stage).__name__, details)


@dataclass
class Context:
    """What a stage may use while it runs, and where it puts what it adds to the summary.

    The runner hands every stage its own context (:meth:`for_stage`): the figures, notes and
    restore record a stage adds are read from it after :meth:`Stage.apply` returns.
    """

    original: nn.Module
    """The model before the recipe's first stage (the default distillation teacher). Do not modify."""
    data: Mapping[str, Iterable[Batch]]
    """Loaders: ``train``, ``calibration``, ``eval``, and ``validation`` when the data factory gives one."""
    example_inputs: torch.Tensor
    """One batch of inputs, for tracing and measuring."""
    evaluate: Callable[[nn.Module], float]
    """The recipe's evaluate metric applied to the eval data: what the summary reports."""
    validate: Callable[[nn.Module], float] | None = None
    """The same metric on the ``validation`` data, when the data factory returns such a loader (else
    None): what a stage chooses by (best epoch, early stopping), so that the eval data only reports."""
    metric_name: str = "accuracy"
    """The name of the evaluate metric in the summary."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    base_dir: Path | None = None
    """Directory of the recipe file: relative paths in stage options are resolved against it."""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("torchslim"))
    latency_batch: int = LATENCY_BATCH
    """The batch size latency is measured at (the recipe's ``metrics.batch_size``): what a stage that
    chooses kernels by timing them should time."""
    threads: int | None = LATENCY_THREADS
    """The torch threads latency is measured with (``metrics.threads``; None: torch's own setting)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """This stage's own figures (:meth:`add_metric`), shown in its row of the summary and report."""
    notes: list[str] = field(default_factory=list)
    """This stage's remarks (:meth:`note`), printed under the summary table."""
    shared: dict[str, Any] = field(default_factory=dict)
    """What several stages read and the run keeps once (the calibration inputs: ``plugins/_calibration.py``);
    the same dict for every stage of a run (:meth:`for_stage` keeps it), keyed by what it holds."""
    restore_record: dict[str, Any] = field(default_factory=dict)
    """What this stage changed in the model's structure (:meth:`record_for_restore`), saved with the
    model and handed back to :meth:`Stage.restore`."""
    kept_input: bool = False
    """Set by :meth:`keep_input`: this stage returns the model it received on purpose."""

    @property
    def selection_split(self) -> str:
        """The data a stage chooses on: ``validation`` when there is such a loader, else ``eval``."""
        return "validation" if self.validate is not None else "eval"

    def select_score(self, model: nn.Module) -> float:
        """The metric to choose by (an epoch, a variant): on the validation data when there is some,
        else on the eval data (then choosing and reporting share one split: say so)."""
        return self.validate(model) if self.validate is not None else self.evaluate(model)

    def validation_figures(self, model: nn.Module) -> dict[str, float]:
        """``{"validation_<metric>": score}`` for a summary row, or nothing without validation data."""
        return {f"validation_{self.metric_name}": self.validate(model)} if self.validate is not None else {}

    def for_stage(self) -> Context:
        """A copy sharing the model, data and settings, with empty figures, notes and record."""
        return dataclasses.replace(self, metrics={}, notes=[], restore_record={}, kept_input=False)

    def keep_input(self) -> None:
        """Declare that this run of the stage returns the model it received unchanged on purpose (a
        training stage whose epochs all scored worse), so the engine accepts it instead of failing as
        it does for a stage that changed nothing. Say why in a :meth:`note`."""
        self.kept_input = True

    def add_metric(self, name: str, value: Any) -> None:
        """Add a figure to this stage's row: ``rows[i].metrics`` of report.json and a column of
        report.csv (the printed table and report.md show the common columns only)."""
        self.metrics[name] = value

    def note(self, text: str) -> None:
        """Add a remark to be printed under the summary table (each distinct text once)."""
        if text not in self.notes:
            self.notes.append(text)

    def record_for_restore(self, **values: Any) -> None:
        """Record, as plain data (numbers, strings, lists, dicts), what :meth:`Stage.restore` needs
        to rebuild this stage's structure on a fresh model."""
        self.restore_record.update(values)
