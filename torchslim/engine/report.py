"""The stage-by-stage summary: a table for the terminal, and JSON, CSV and Markdown files."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from . import names
from .atomic import write_text

#: Columns of the printed table: (metric key, header, formatter kind).
_COLUMNS = [
    (names.PARAMS, "params", "count"),
    (names.NONZERO, "non-zero", "count"),
    (names.SPARSITY, "sparsity", "percent"),
    (names.SIZE_BYTES, "size (x smaller)", "bytes"),
    (names.PACKED_BYTES, "packed", "bytes"),
    (names.MACS, "MACs (x fewer)", "count"),
    (names.LATENCY_MS, "latency ms (x faster)", "float"),
]
_RATIO_COLUMNS = (names.SIZE_BYTES, names.MACS, names.LATENCY_MS)


@dataclass
class Row:
    """One line of the summary: the baseline (``type`` None) or one stage."""

    stage: str
    type: str | None
    metrics: dict[str, Any]
    unchanged: bool = False
    """A stage that declares it leaves the model as it was (``changes_model = False``): its figures
    are the row above's, not measured again."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        data = {"stage": self.stage, "type": self.type, "metrics": dict(self.metrics)}
        return {**data, "unchanged": True} if self.unchanged else data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """The row :meth:`to_dict` gave."""
        return cls(data["stage"], data["type"], dict(data["metrics"]), bool(data.get("unchanged", False)))


@dataclass
class Report:
    """What a run produced: the resolved recipe, one row per stage after the baseline, and notes."""

    recipe: dict[str, Any]
    metric: str = "accuracy"
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def add_notes(self, notes: list[str]) -> None:
        """Add remarks printed under the table, each distinct text once, in order."""
        self.notes.extend(note for note in dict.fromkeys(notes) if note not in self.notes)

    @property
    def baseline(self) -> Row:
        """Row 0: the model before any stage."""
        return self.rows[0]

    @property
    def final(self) -> Row:
        """The last row: the model after every stage."""
        return self.rows[-1]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "recipe": self.recipe,
            "metric": self.metric,
            "rows": [row.to_dict() for row in self.rows],
            "notes": list(self.notes),
            "environment": dict(self.environment),
        }

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n"

    def to_csv(self) -> str:
        """One CSV line per row, one column per metric."""
        keys = _metric_keys(self.rows)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["stage", "type", *keys])
        for row in self.rows:
            writer.writerow([row.stage, row.type or "baseline", *(row.metrics.get(k, "") for k in keys)])
        return out.getvalue()

    def table(self, fmt: str = "simple") -> str:
        """The summary table, each figure followed by its ratio to the baseline."""
        headers = ["stage", "type", *(h for _, h, _ in _COLUMNS), f"{self.metric} (change)", "seconds"]
        body = [self._cells(row) for row in self.rows]
        text = tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True, colalign=("left", "left"))
        return text + "".join(f"\nnote: {note}" for note in self.notes)

    def to_markdown(self) -> str:
        """A Markdown page with the table and the notes."""
        title = f"# torchslim report: {self.recipe.get('name', '')}\n\n"
        notes = "".join(f"- {note}\n" for note in self.notes)
        table = self.table("github").split("\nnote: ")[0]
        return title + table + "\n" + (f"\n## Notes\n\n{notes}" if notes else "")

    def _cells(self, row: Row) -> list[str]:
        base = self.baseline.metrics
        kind = row.type or "baseline"
        cells = [row.stage, f"{kind} (unchanged)" if row.unchanged else kind]
        for key, _, kind in _COLUMNS:
            ratio = key in _RATIO_COLUMNS and row is not self.baseline
            value = row.metrics.get(key)
            cells.append(with_ratio(value, base.get(key), kind) if ratio else format_figure(value, kind))
        cells.append(with_delta(row.metrics.get(self.metric), base.get(self.metric), row is self.baseline))
        cells.append(format_figure(row.metrics.get(names.SECONDS), "float"))
        return cells

    def write(self, out_dir: Path) -> None:
        """Write report.json, report.csv and report.md into ``out_dir``, each atomically."""
        write_text(out_dir / "report.json", self.to_json())
        write_text(out_dir / "report.csv", self.to_csv())
        write_text(out_dir / "report.md", self.to_markdown())


def _metric_keys(rows: list[Row]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.metrics if k not in keys)
    return keys


def format_figure(value: Any, kind: str) -> str:
    """One figure as the tables show it: ``count`` (SI prefixes), ``bytes``, ``percent`` or ``float``; ``-`` if not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "count":
        return _si(float(value))
    if kind == "bytes":
        return _si(float(value), "B", 1000.0)
    if kind == "percent":
        return f"{100 * value:.1f}%"
    return f"{value:.2f}"


def _si(value: float, unit: str = "", step: float = 1000.0) -> str:
    for prefix in ("", "k", "M", "G"):
        if abs(value) < step or prefix == "G":
            return f"{value:.0f}{unit}" if prefix == "" else f"{value:.1f}{prefix}{unit}"
        value /= step
    return f"{value}"


def with_ratio(value: Any, base: Any, kind: str) -> str:
    """The figure followed by its ratio to the baseline, e.g. ``100.9kB (3.40x)``."""
    # The ratio is baseline / value: above 1 means smaller, fewer or faster than the baseline.
    text = format_figure(value, kind)
    return f"{text} ({base / value:.2f}x)" if value and base else text


def with_delta(value: Any, base: Any, is_baseline: bool) -> str:
    """The task metric followed by its change from the baseline, e.g. ``96.67 (+0.56)``."""
    text = format_figure(value, "float")
    if is_baseline or value is None or base is None:
        return text
    return f"{text} ({value - base:+.2f})"
