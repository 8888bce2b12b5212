"""The recipe fields that only a comparison or a search reads: ``sweep``, ``sweep_mode``, ``constraints``
and ``search``.

They are part of the recipe's shape (its schema, its validation errors), so their types and
validators live with the recipe, in the engine; :mod:`torchslim.compare` expands sweeps and
checks budgets with them, :mod:`torchslim.search` searches the space of ``search``. A sweep turns
one recipe into several variants (one per combination of values); constraints are the user's
budget, against which each variant passes or fails; a search samples the variants it runs.
"""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from .errors import RecipeError
from .specs import Spec

if TYPE_CHECKING:
    from .recipe import RecipeBase

#: ``stages.0.amount``, ``seed``, ``model.kwargs.hidden``: field names and list indexes joined by dots.
SWEEP_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")
#: Top-level fields a sweep may not change: they describe the comparison, not the run.
UNSWEEPABLE = ("name", "sweep", "sweep_mode", "constraints", "search")

SweepValues = dict[str, list[Any]]
SweepMode = Literal["grid", "zip"]


class Constraints(Spec):
    """A budget: the variants of a comparison that meet every limit given here pass.

    The metric limits apply to the recipe's evaluate metric (``accuracy`` or a custom one),
    taken as higher-is-better, in its own units (points for accuracy). Sizes are in megabytes
    of 1,000,000 bytes.
    """

    max_accuracy_drop: float | None = Field(default=None, ge=0)
    """At most this much below the baseline's metric (e.g. ``1.0``: one accuracy point)."""
    min_accuracy: float | None = None
    """At least this value of the metric after every stage."""
    max_size_mb: float | None = Field(default=None, gt=0)
    """At most this many MB for the dense file (``size_bytes``)."""
    max_packed_mb: float | None = Field(default=None, gt=0)
    """At most this many MB for the packed file (``packed_bytes``; fails where it is not measured)."""
    max_latency_ms: float | None = Field(default=None, gt=0)
    """At most this median latency, in milliseconds (fails where latency is not measured)."""
    max_macs: int | None = Field(default=None, gt=0)
    """At most this many multiply-accumulates per sample."""
    min_size_ratio: float | None = Field(default=None, gt=0)
    """At least this many times smaller than the baseline's dense file."""
    min_speedup: float | None = Field(default=None, gt=0)
    """At least this many times faster than the baseline."""

    def given(self) -> dict[str, Any]:
        """The limits that are set, by name."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def check_sweep(value: SweepValues | None) -> SweepValues | None:
    """Validate the shape of ``sweep``: dotted paths to non-empty value lists (the paths are
    checked against the recipe when it is expanded)."""
    for path, values in (value or {}).items():
        if not SWEEP_PATH.match(path):
            raise ValueError(f"'{path}' is not a dotted path such as stages.0.amount")
        if path.split(".")[0] in UNSWEEPABLE:
            raise ValueError(f"'{path}': {path.split('.')[0]} cannot be swept")
        if not values:
            raise ValueError(f"'{path}': give at least one value")
    return value


def check_zip(mode: SweepMode, sweep: SweepValues | None) -> SweepMode:
    """In ``zip`` mode every value list must have the same length."""
    lengths = {path: len(values) for path, values in (sweep or {}).items()}
    if mode == "zip" and len(set(lengths.values())) > 1:
        listed = ", ".join(f"{path}: {n}" for path, n in lengths.items())
        raise ValueError(f"zip pairs the i-th values of every path, so the lists need the same length ({listed})")
    return mode


def refuse_sweep(recipe: RecipeBase) -> None:
    """RecipeError for ``torchslim run`` of a sweep or search recipe: it is several runs, made by ``compare``
    or ``search``."""
    if recipe.sweep:
        source = recipe.document.source if recipe.document is not None else "RECIPE"
        raise RecipeError(
            f"{recipe.where(('sweep',))}: sweep: this recipe is a sweep of several variants; "
            f"run it with `torchslim compare {source}` (torchslim run takes one concrete recipe)"
        )
    if recipe.search is not None:
        source = recipe.document.source if recipe.document is not None else "RECIPE"
        raise RecipeError(
            f"{recipe.where(('search',))}: search: this recipe is a search over many variants; "
            f"run it with `torchslim search {source} --out DIR` (torchslim run takes one concrete recipe)"
        )


#: A value ``when`` compares with: what Optuna stores as a categorical choice.
Scalar = bool | int | float | str | None
#: What a search minimises or maximises, read from each trial's final row.
Objective = Literal["metric", "latency", "size", "packed_size", "macs"]
SamplerName = Literal["tpe", "nsga2", "random"]


class SearchDimension(Spec):
    """One dimension of a search space: a number range (``low``, ``high``) or a list of ``choices``."""

    low: int | float | None = None
    """Smallest value of a range."""
    high: int | float | None = None
    """Largest value of a range."""
    step: int | float | None = Field(default=None, gt=0)
    """Spacing of the values of a range (none: any value in it)."""
    log: bool = False
    """Sample the range on a log scale (low above 0; not with step)."""
    integer: bool | None = Field(default=None, alias="int")
    """Whole numbers only; by default when low, high (and step) are written as whole numbers."""
    choices: list[Any] | None = Field(default=None, min_length=1)
    """The values to choose from, instead of a range: numbers, strings, booleans, null, or lists and mappings
    (a list of layer names, say)."""
    when: dict[str, Scalar | list[Scalar]] | None = None
    """Sample this dimension only when each given path holds the given value (or one of a list of values):
    ``{stages.2.method: kbit}``. A path is an earlier dimension of the space, or a field of the recipe."""

    per_layer: SearchDimension | None = None
    """One value per layer of the stage this path's option belongs to (a low-bit quantize's ``layer_bits``), each
    sampled from this range or these choices, bounded by a sensitivity pass, the first trial a knapsack's
    allocation: ``stages.1.layer_bits: {per_layer: {choices: [1, 2, 4, 8]}}`` (docs/search.md)."""
    per_group: SearchDimension | None = None
    """As ``per_layer``, one value per group of coupled channels (a structured prune's ``group_amounts``)."""

    @model_validator(mode="after")
    def _shape(self) -> SearchDimension:
        ranged = {"low", "high", "step", "log", "integer"} & self.model_fields_set
        if self.per_layer is not None or self.per_group is not None:
            given = sorted((ranged | {"choices", "per_layer", "per_group"}) & self.model_fields_set - {"when"})
            if len(given) > 1:
                raise ValueError(
                    f"per_layer or per_group holds the range or choices of each unit: give it alone ({', '.join(given)} given)"
                )
            return self
        if self.choices is not None:
            if ranged:
                raise ValueError(f"give choices or a range (low, high), not both ({', '.join(sorted(ranged))} given)")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range of numbers), or choices (a list of values)")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: the range must be above 0, without step")
        if self.integer and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError("int: low, high and step must be whole numbers")
        return self

    @property
    def is_int(self) -> bool:
        """Whether the range holds whole numbers (given, or inferred from how its bounds are written)."""
        if self.integer is not None:
            return self.integer
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))


class CheapRung(Spec):
    """One cheaper run a trial passes before its full run: its stages' training shortened, its metric scored on a
    part of the eval data."""

    epochs_scale: float = Field(default=1.0, gt=0, le=1)
    """Each stage's epochs (every whole-number option named ``epochs`` or ``*_epochs``) times this, rounded up."""
    eval_fraction: float = Field(default=1.0, gt=0, le=1)
    """Score on this fraction of the eval (and validation) batches (``evaluate.fraction``)."""

    @model_validator(mode="after")
    def _cheaper(self) -> CheapRung:
        if self.epochs_scale == 1 and self.eval_fraction == 1:
            raise ValueError("a cheap rung is the full run; give epochs_scale or eval_fraction below 1")
        return self


class CheapSpec(Spec):
    """Successive halving: every trial runs cheap first, and only the promising ones go on to the next rung and
    to the full run (Optuna's ``SuccessiveHalvingPruner``; for several objectives, by non-dominated rank)."""

    rungs: list[CheapRung] = Field(min_length=1)
    """The cheaper runs a trial passes, cheapest first; the full run follows the last."""
    reduction_factor: int = Field(default=3, ge=2)
    """At each rung, about one trial in this many goes on (Optuna's ``reduction_factor``)."""

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: list[CheapRung]) -> list[CheapRung]:
        for i, (before, after) in enumerate(itertools.pairwise(value), start=1):
            if after.epochs_scale < before.epochs_scale or after.eval_fraction < before.eval_fraction or after == before:
                raise ValueError(
                    f"rung {i} must cost more than rung {i - 1}: its epochs_scale and eval_fraction at least "
                    f"as large, one of them larger (cheapest first)"
                )
        return value


class SearchSpec(Spec):
    """``torchslim search``: the space of recipe values to search, what to optimise, and for how long."""

    space: dict[str, SearchDimension] = Field(min_length=1)
    """Dotted paths into the recipe (as ``sweep``'s: ``stages.0.amount``), each a range or a list of choices."""
    objectives: list[Objective] = Field(default_factory=lambda: list[Objective](["metric", "latency"]), min_length=1)
    """What to optimise: ``metric`` (maximised), ``latency``, ``size``, ``packed_size``, ``macs`` (minimised)."""
    trials: int | None = Field(default=None, ge=1)
    """Stop after this many trials (failed ones included)."""
    minutes: float | None = Field(default=None, gt=0)
    """Start no trial after this many minutes of searching (the trial running then finishes)."""
    sampler: SamplerName = "tpe"
    """Optuna's sampler: ``tpe`` (one or several objectives), ``nsga2`` (several objectives), ``random`` (the control)."""
    startup_trials: int = Field(default=10, ge=2)
    """Trials sampled at random before the sampler models the results (TPE's startup, NSGA-II's population)."""
    seed: int = 0
    """Seed of the sampler: the same seed and results give the same trials."""
    cheap: CheapSpec | None = None
    """Run every trial cheaply first (shorter training, part of the eval data); only the promising ones run in full."""
    latency_reference: bool = True
    """Read each trial's latency against a reference timed in turns with it (the baseline through the recipe's
    stages from its first ``deploy`` on, run once into ``OUT/reference``; without a deploy stage, the baseline):
    the reference's latency times their paired ratio, a figure that holds while the machine's load changes
    between trials. false: each trial's latency as timed alone. Only where latency is an objective or a limit."""

    @field_validator("space")
    @classmethod
    def _paths(cls, value: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        check_sweep({path: [None] for path in value})
        earlier: set[str] = set()
        for path, dimension in value.items():
            later = [p for p in dimension.when or {} if p in value and p not in earlier]
            if later:
                raise ValueError(f"'{path}': when: {', '.join(later)} is sampled after it; list it before '{path}'")
            for p in dimension.when or {}:
                check_sweep({p: [None]})
            earlier.add(path)
        return value

    @field_validator("objectives")
    @classmethod
    def _once(cls, value: list[Objective]) -> list[Objective]:
        twice = sorted({o for o in value if value.count(o) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice; give each objective once")
        return value

    @model_validator(mode="after")
    def _budget(self) -> SearchSpec:
        if self.trials is None and self.minutes is None:
            raise ValueError("give the search a budget: trials, minutes or both")
        return self


def check_search(value: SearchSpec | None, sweep: SweepValues | None) -> SearchSpec | None:
    """A recipe is a sweep (``torchslim compare``) or a search (``torchslim search``), not both."""
    if value is not None and sweep:
        raise ValueError("a recipe with sweep is run by torchslim compare; a search explores its own space: give one of them")
    return value
