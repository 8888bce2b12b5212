"""A comparison's budget: the one set of constraints its recipes agree on, and the checks against it.

The constraints' fields belong to the recipe (:mod:`torchslim.engine.study_fields`); what they
mean for a measured variant, and which passing variant is best, is decided here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..engine import names
from ..engine.errors import RecipeError
from ..engine.recipe import RecipeBase
from ..engine.study_fields import Constraints
from .pareto import best, selection_key

if TYPE_CHECKING:
    from .table import Comparison

MB = 1_000_000


class Budget(Constraints):
    """The constraints of a comparison, able to say why a measured variant misses them."""

    def failures(self, final: dict[str, Any], baseline: dict[str, Any], metric: str) -> list[str]:
        """Why a model with ``final`` metrics misses this budget (empty when it meets it)."""
        value, base = final.get(metric), baseline.get(metric)
        checks: list[tuple[float | None, Any, str, str, float]] = [
            # (limit, measured value, what, unit, scale of the measured value); "<=" checks
            (self.max_size_mb, final.get(names.SIZE_BYTES), "size", "MB", 1 / MB),
            (self.max_packed_mb, final.get(names.PACKED_BYTES), "packed size", "MB", 1 / MB),
            (self.max_latency_ms, final.get(names.LATENCY_MS), "latency", "ms", 1.0),
            (self.max_macs, final.get(names.MACS), "MACs", "", 1.0),
            (self.max_accuracy_drop, _difference(base, value), f"{metric} drop", "", 1.0),
        ]
        problems = [_over(*check) for check in checks]
        floors: list[tuple[float | None, Any, str, str]] = [
            (self.min_accuracy, value, metric, ""),
            (self.min_size_ratio, _ratio(baseline.get(names.SIZE_BYTES), final.get(names.SIZE_BYTES)), "size ratio", "x"),
            (self.min_speedup, _ratio(baseline.get(names.LATENCY_MS), final.get(names.LATENCY_MS)), "speed-up", "x"),
        ]
        problems += [_under(*floor) for floor in floors]
        return [p for p in problems if p]


def _difference(base: Any, value: Any) -> float | None:
    return float(base) - float(value) if isinstance(base, (int, float)) and isinstance(value, (int, float)) else None


def _ratio(base: Any, value: Any) -> float | None:
    return float(base) / float(value) if isinstance(base, (int, float)) and isinstance(value, (int, float)) and value else None


def _over(limit: float | None, value: Any, what: str, unit: str, scale: float) -> str | None:
    if limit is None:
        return None
    if not isinstance(value, (int, float)):
        return f"{what} not measured (limit {limit:g}{unit})"
    return f"{what} {value * scale:.4g}{unit} > {limit:g}{unit}" if value * scale > limit else None


def _under(limit: float | None, value: Any, what: str, unit: str) -> str | None:
    if limit is None:
        return None
    if not isinstance(value, (int, float)):
        return f"{what} not measured (limit {limit:g}{unit})"
    return f"{what} {value:.4g}{unit} < {limit:g}{unit}" if value < limit else None


def merge(recipes: list[RecipeBase]) -> Budget | None:
    """One budget for the whole comparison: the constraints its recipes give, which must agree."""
    merged: dict[str, tuple[Any, str]] = {}
    for recipe in recipes:
        for key, value in (recipe.constraints.given() if recipe.constraints else {}).items():
            where = recipe.where(("constraints", key))
            if key in merged and merged[key][0] != value:
                raise RecipeError(
                    f"{where}: constraints.{key}: {value} here but {merged[key][0]} at {merged[key][1]}; "
                    f"a comparison has one budget: give the same value, or leave it out of one recipe"
                )
            merged.setdefault(key, (value, where))
    return Budget(**{k: v for k, (v, _) in merged.items()}) if merged else None


def judge(comparison: Comparison, budget: Budget | None) -> None:
    """Record the budget's verdict on each entry that ran, and the best passing entry."""
    comparison.constraints = budget
    if budget is None:
        return
    metric = comparison.metric
    for entry in comparison.entries:
        if entry.final is not None:
            entry.failures = budget.failures(entry.final, comparison.baselines[entry.group].metrics, metric)
    passing = [(e.name, e.final) for e in comparison.entries if e.failures == [] and e.final is not None]
    comparison.best = best(passing, metric)
    comparison.chosen_on = "validation" if selection_key(passing, metric) != metric else "eval"
