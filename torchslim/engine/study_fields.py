"""The recipe fields that only a comparison reads: ``sweep``, ``sweep_mode`` and ``constraints``.

They are part of the recipe's shape (its schema, its validation errors), so their types and
validators live with the recipe, in the engine; :mod:`torchslim.compare` expands sweeps and
checks budgets with them. A sweep turns one recipe into several variants (one per combination
of values); constraints are the user's budget, against which each variant passes or fails.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from .errors import RecipeError
from .specs import Spec

if TYPE_CHECKING:
    from .recipe import RecipeBase

#: ``stages.0.amount``, ``seed``, ``model.kwargs.hidden``: field names and list indexes joined by dots.
SWEEP_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")
#: Top-level fields a sweep may not change: they describe the comparison, not the run.
UNSWEEPABLE = ("name", "sweep", "sweep_mode", "constraints")

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
    """RecipeError for ``torchslim run`` of a sweep recipe: it is several runs, made by ``compare``."""
    if recipe.sweep:
        source = recipe.document.source if recipe.document is not None else "RECIPE"
        raise RecipeError(f"{recipe.where(('sweep',))}: sweep: this recipe is a sweep of several variants; "
                          f"run it with `torchslim compare {source}` (torchslim run takes one concrete recipe)")
