"""Pareto fronts of a comparison: the variants that no other beats on both the metric and a cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..engine import names

#: Costs against which the metric is traded, with the metric key that holds each.
COSTS = {"size": names.SIZE_BYTES, "latency": names.LATENCY_MS}

Point = tuple[Any, Any]


def front(points: Sequence[Point]) -> list[bool]:
    """For ``(metric, cost)`` points, whether each is on the Pareto front.

    The metric is maximised and the cost minimised: a point is off the front when another
    point is at least as good on both and strictly better on one. Points with a missing value
    are never on it, and never push another off it. Equal points are on it together.
    """
    valid = [_valid(p) for p in points]
    return [
        valid[i] and not any(valid[j] and _dominates(points[j], points[i]) for j in range(len(points)))
        for i in range(len(points))
    ]


def _valid(point: Point) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point)


def _dominates(a: Point, b: Point) -> bool:
    (metric_a, cost_a), (metric_b, cost_b) = a, b
    return bool(metric_a >= metric_b and cost_a <= cost_b and (metric_a > metric_b or cost_a < cost_b))


def fronts(
    finals: Sequence[dict[str, Any] | None], metric: str, baselines: Sequence[dict[str, Any] | None] | None = None
) -> list[list[str]]:
    """For each variant's final metrics (None for a failed variant), the fronts it is on: ``size``, ``latency``.

    With ``baselines`` (each variant's baseline metrics), a variant slower than its baseline is
    never on the latency front: whatever its metric, the uncompressed model beats it on time.
    """
    bases = baselines if baselines is not None else [None] * len(finals)
    marks: list[list[str]] = [[] for _ in finals]
    for cost, key in COSTS.items():
        points = [(m.get(metric), m.get(key)) if m is not None else (None, None) for m in finals]
        if cost == "latency":
            points = [(None, None) if slower(m, b) else p for p, m, b in zip(points, finals, bases, strict=True)]
        for index, flag in enumerate(front(points)):
            if flag:
                marks[index].append(cost)
    return marks


def slower(final: dict[str, Any] | None, baseline: dict[str, Any] | None) -> bool:
    """Whether a variant's latency is above its baseline's (False when either is not measured)."""
    if final is None or baseline is None or not _valid((final.get(names.LATENCY_MS), baseline.get(names.LATENCY_MS))):
        return False
    return bool(final[names.LATENCY_MS] > baseline[names.LATENCY_MS])


def selection_key(candidates: Sequence[tuple[str, dict[str, Any]]], metric: str) -> str:
    """The key to choose the best candidate by: ``validation_<metric>`` when every candidate has
    that figure (scored on the validation data), else ``metric`` itself (the reported eval figure)."""
    held_out = f"validation_{metric}"
    if candidates and all(_valid((m.get(held_out), 0)) for _, m in candidates):
        return held_out
    return metric


def best(candidates: Sequence[tuple[str, dict[str, Any]]], metric: str) -> str | None:
    """The name of the candidate with the highest metric (see :func:`selection_key`: the validation
    figure when every candidate has one); ties go to the smaller dense file."""
    key = selection_key(candidates, metric)
    scored = [(name, m) for name, m in candidates if _valid((m.get(key), m.get(names.SIZE_BYTES)))]
    if not scored:
        return None
    return min(scored, key=lambda item: (-float(item[1][key]), float(item[1][names.SIZE_BYTES])))[0]
