"""What a search optimises and what it must meet, read from a trial's final row against its baseline.

Objectives are raw figures (the metric maximised; latency, sizes and MACs minimised). Each limit of the
recipe's ``constraints`` becomes one Optuna constraint: how far the trial misses it, as a fraction of the
limit (0 or below: met), so that samplers prefer feasible trials and the closest miss can be named.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..compare.budget import MB, Budget
from ..engine import names
from ..engine.study_fields import Objective

#: The final-row key of each objective other than the metric.
KEYS: dict[str, str] = {
    "latency": names.LATENCY_MS,
    "size": names.SIZE_BYTES,
    "packed_size": names.PACKED_BYTES,
    "macs": names.MACS,
}
#: A limit that cannot be judged (its figure not measured) counts as missed by this fraction.
UNMEASURED = 1.0


def key(objective: Objective, metric: str) -> str:
    """The final row's key holding ``objective``."""
    return metric if objective == "metric" else KEYS[objective]


def directions(objectives: Sequence[Objective]) -> list[str]:
    """Optuna's direction of each objective."""
    return ["maximize" if o == "metric" else "minimize" for o in objectives]


def values(objectives: Sequence[Objective], final: dict[str, Any], metric: str) -> list[float] | str:
    """The objective values of a trial, or why they cannot be read (a figure not measured)."""
    found = [final.get(key(o, metric)) for o in objectives]
    missing = [o for o, v in zip(objectives, found, strict=True) if not _number(v)]
    if missing:
        return (
            f"{', '.join(missing)} not measured (an objective needs it: check metrics.collect and metrics.latency, "
            f"or choose other objectives)"
        )
    return [float(v) for v in found if v is not None]


def excesses(budget: Budget, final: dict[str, Any], baseline: dict[str, Any], metric: str) -> dict[str, float]:
    """For each limit of ``budget``, how far ``final`` misses it as a fraction of the limit (<= 0: met)."""
    value, base = final.get(metric), baseline.get(metric)
    measured: dict[str, Any] = {
        "max_size_mb": _scaled(final.get(names.SIZE_BYTES), 1 / MB),
        "max_packed_mb": _scaled(final.get(names.PACKED_BYTES), 1 / MB),
        "max_latency_ms": final.get(names.LATENCY_MS),
        "max_macs": final.get(names.MACS),
        "max_accuracy_drop": _drop(base, value),
        "min_accuracy": value,
        "min_size_ratio": _ratio(baseline.get(names.SIZE_BYTES), final.get(names.SIZE_BYTES)),
        "min_speedup": _ratio(baseline.get(names.LATENCY_MS), final.get(names.LATENCY_MS)),
    }
    out: dict[str, float] = {}
    for name, limit in budget.given().items():
        figure = measured[name]
        if not _number(figure):
            out[name] = UNMEASURED
            continue
        over = figure - limit if name.startswith("max_") else limit - figure
        out[name] = over / (abs(limit) or 1.0)  # a limit of 0 (no accuracy drop at all): in the metric's units
    return out


def total_miss(excess: dict[str, float]) -> float:
    """The sum of the misses (0: every limit met): the closest trial has the smallest."""
    return sum(max(0.0, v) for v in excess.values())


def _scaled(value: Any, scale: float) -> float | None:
    return float(value) * scale if _number(value) else None


def _drop(base: Any, value: Any) -> float | None:
    return float(base) - float(value) if _number(base) and _number(value) else None


def _ratio(base: Any, value: Any) -> float | None:
    return float(base) / float(value) if _number(base) and _number(value) and value else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # NaN is not a figure
