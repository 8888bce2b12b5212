"""One trial of a search as plain data: what it tried, where its report is, what it measured or why it failed.

A record is stored with the trial (an Optuna user attribute) when the trial ends, so that the front and the
best recipe are rebuilt from the study alone after a resume. A trial without a record was interrupted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..compare.sweep import folder_name
from ..engine import names

#: The user attribute of an Optuna trial holding its record.
ATTRIBUTE = "torchslim"
#: The final-row figures a record keeps (besides the metric and its validation figure).
FIGURES = (names.SIZE_BYTES, names.PACKED_BYTES, names.MACS, names.LATENCY_MS, names.LATENCY_ALONE_MS, names.RUNTIME)


@dataclass(frozen=True)
class Record:
    """A finished trial: its values and figures, or its error."""

    number: int
    """The search's trial number, from 1 (an interrupted trial's rerun keeps its number)."""
    values: dict[str, Any]
    """The sampled values, by dotted path."""
    folder: str
    """Its report directory, under the search's ``trials/``."""
    seconds: float
    """Wall time of the trial (validation, stages, measurement)."""
    error: str | None = None
    """Why it failed (a refused value, a stage's error); None when it ran."""
    final: dict[str, Any] = field(default_factory=dict)
    """The figures of its last row that a search reads (the metric, sizes, MACs, latency)."""
    baseline: dict[str, Any] = field(default_factory=dict)
    """The same figures of its baseline."""
    objectives: list[float] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    """The budget's limits it misses, in words (empty: it meets them, or there is no budget)."""
    excess: dict[str, float] = field(default_factory=dict)
    """How far it misses each limit, as a fraction of the limit (<= 0: met)."""
    rungs: list[dict[str, Any]] = field(default_factory=list)
    """Its cheap runs (``search.cheap``), cheapest first: each the record of that run (:meth:`to_attr`)."""
    stopped: int | None = None
    """The cheap rung after which it stopped (not promising enough to go on); its figures are that rung's.
    None: it ran in full (or failed)."""

    @property
    def ok(self) -> bool:
        """It ran in full, and its objectives were measured."""
        return self.error is None and self.stopped is None

    def to_attr(self) -> dict[str, Any]:
        """Plain data for the trial's user attribute (JSON)."""
        return json.loads(json.dumps(asdict(self), default=str))  # type: ignore[no-any-return]

    @classmethod
    def from_attr(cls, data: dict[str, Any]) -> Record:
        """The record :meth:`to_attr` stored."""
        return cls(**data)


def kept_figures(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    """The figures of a row that a record keeps."""
    keys = (metric, f"validation_{metric}", *FIGURES)
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def describe_values(values: dict[str, Any], short: bool = False) -> str:
    """``stages.0.amount=0.4372, stages.1.method=static``: floats to 4 significant digits; with ``short``, a per-unit
    mapping by its settings alone, in its units' order (``stages.1.layer_bits=8+8+1+8``: :func:`unit_orders`)."""
    return ", ".join(f"{path}={_settings(value) if short else _short(value)}" for path, value in values.items())


def unit_orders(records: list[Record]) -> dict[str, list[str]]:
    """The units of each per-unit value of ``records``, in the order a short description gives their settings."""
    return {p: list(v) for r in records for p, v in r.values.items() if isinstance(v, dict)}


def trial_folder(number: int, values: dict[str, Any]) -> str:
    """``003-stages.0.amount=0.4372_stages.1.method=static``, cut to a length every file system takes; a per-unit
    mapping by its settings alone (``stages.1.layer_bits=8+8+1+8``): its unit names would fill the length, and
    every trial of the search would get the same name but for its number."""
    return f"{number:03d}-{folder_name(describe_values(values, short=True))}"[:120].rstrip("_.")


def _settings(value: Any) -> str:
    return "+".join(_short(v) for v in value.values()) if isinstance(value, dict) else _short(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)
