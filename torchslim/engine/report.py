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
from .noise import latency_noise, opposed_directions, speedup_noise

#: Columns of the printed table: (metric key, header, formatter kind).
_COLUMNS = [
    (names.PARAMS, "params", "count"),
    (names.NONZERO, "non-zero", "count"),
    (names.SPARSITY, "sparsity", "percent"),
    (names.SIZE_BYTES, "size (x smaller)", "bytes"),
    (names.PACKED_BYTES, "packed", "bytes"),
    (names.MACS, "MACs (x fewer)", "count"),
    (names.LATENCY_MS, "latency ms (x faster)", "ms"),
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


#: The files :meth:`Report.write` writes; ``report.json`` is the one read back (:meth:`Report.read`).
REPORT_JSON, REPORT_CSV, REPORT_MD = "report.json", "report.csv", "report.md"
REPORT_FILES = (REPORT_JSON, REPORT_CSV, REPORT_MD)


@dataclass
class Report:
    """What a run produced: the resolved recipe, one row per stage after the baseline, and notes."""

    recipe: dict[str, Any]
    metric: str = "accuracy"
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    speedup: dict[str, Any] | None = None
    """baseline / final latency, timed interleaved at the end of the run (:class:`~torchslim.engine.timing.Speedup`)."""
    reference: dict[str, Any] | None = None
    """The final model timed in turns with ``metrics.reference`` (:func:`~torchslim.engine.reference.time_against`)."""

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
            **({"speedup": dict(self.speedup)} if self.speedup else {}),
            **({"reference": dict(self.reference)} if self.reference else {}),
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
        # A row measured in a runtime other than torch (after a deploy stage) says which one.
        kind += f" @{str(row.metrics[names.RUNTIME]).split()[0]}" if row.metrics.get(names.RUNTIME) else ""
        cells = [row.stage, f"{kind} (unchanged)" if row.unchanged else kind]
        for key, _, kind in _COLUMNS:
            ratio = key in _RATIO_COLUMNS and row is not self.baseline
            value = row.metrics.get(key)
            noisy = key == names.LATENCY_MS and self._noisy(row, ratio)
            cells.append(with_ratio(value, base.get(key), kind, noisy) if ratio else format_figure(value, kind, noisy))
        cells.append(with_delta(row.metrics.get(self.metric), base.get(self.metric), row is self.baseline))
        cells.append(format_figure(row.metrics.get(names.SECONDS), "float"))
        return cells

    def _noisy(self, row: Row, against_baseline: bool) -> bool:
        # A ratio is as noisy as the noisier of its two figures.
        rows = (row, self.baseline) if against_baseline else (row,)
        return any(latency_noise(r.metrics, self.environment) for r in rows if r.metrics.get(names.LATENCY_MS))

    def measurement_notes(self) -> list[str]:
        """The speed-up line and why figures marked ``~`` are noisy: derived from the figures, added by the runner at the end."""
        lines = [self._speedup_line()] if self.speedup else []
        noisy: dict[str, list[str]] = {}
        for row in self.rows:
            reason = latency_noise(row.metrics, self.environment) if row.metrics.get(names.LATENCY_MS) else None
            if reason:
                noisy.setdefault(reason, []).append(row.stage)
        if noisy:
            why = "; ".join(f"{', '.join(stages)}: {reason}" for reason, stages in noisy.items())
            lines.append(f"~ marks a noisy latency, and every ratio to it: read it as noise, not as a measurement ({why})")
        return lines

    def _speedup_line(self) -> str:
        s = self.speedup or {}
        reason = speedup_noise(s, self.environment)
        mark = "~" if reason else ""
        what = (
            f"speed-up of the final model ({self.final.stage}) over the baseline, both timed interleaved at the end of the run: "
        )
        spread = (
            f"interquartile {ratio_text(s['q1'])}x to {ratio_text(s['q3'])}x over {s['rounds']} rounds; "
            f"baseline {format_figure(s['baseline_ms'], 'ms')} ms, final {format_figure(s['final_ms'], 'ms')} ms"
        )
        opposed = opposed_directions(s)
        if opposed:  # one figure would claim a direction the other contradicts
            return f"{what}not measured: {opposed}, so the rounds do not say which is faster ({spread})"
        text = f"{what}{ratio_text(s['ratio'])}x{mark} ({spread})"
        return text + (f"; noisy: {reason}" if reason else "")

    def write(self, out_dir: Path) -> None:
        """Write report.json, report.csv and report.md into ``out_dir``, each atomically."""
        write_text(out_dir / REPORT_JSON, self.to_json())
        write_text(out_dir / REPORT_CSV, self.to_csv())
        write_text(out_dir / REPORT_MD, self.to_markdown())

    @classmethod
    def read(cls, folder: Path) -> Report:
        """The report :meth:`write` wrote into ``folder`` (OSError, ValueError, KeyError or TypeError when it
        is missing, half-written by hand, or of another format)."""
        data = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
        rows = [Row.from_dict(r) for r in data["rows"]]
        return cls(
            data["recipe"],
            data["metric"],
            rows,
            list(data["notes"]),
            data["environment"],
            data.get("speedup"),
            data.get("reference"),
        )


def _metric_keys(rows: list[Row]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.metrics if k not in keys)
    return keys


def format_figure(value: Any, kind: str, noisy: bool = False) -> str:
    """One figure as the tables show it: ``count`` (SI prefixes), ``bytes``, ``percent``, ``ms`` (3
    significant digits), ``metric`` (4) or ``float``; ``-`` if not measured; ``~`` after a noisy one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    mark = "~" if noisy else ""
    if kind == "count":
        return _si(float(value)) + mark
    if kind == "bytes":
        return _si(float(value), "B", 1000.0) + mark
    if kind == "percent":
        return f"{100 * value:.1f}%{mark}"
    if kind in ("ms", "metric"):
        return f"{value:.{_decimals(value, 3 if kind == 'ms' else 4)}f}{mark}"
    return f"{value:.2f}{mark}"


def _decimals(value: float, digits: int, least: int = 2) -> int:
    """Decimals that show ``digits`` significant digits of ``value`` (and at least ``least``)."""
    rounded = float(f"{value:.{digits}g}")  # 0.99996 has the digits of 1.00, not of 0.99996
    if rounded == 0 or not math.isfinite(rounded):
        return least
    return max(least, digits - 1 - math.floor(math.log10(abs(rounded))))


def _si(value: float, unit: str = "", step: float = 1000.0) -> str:
    for prefix in ("", "k", "M", "G"):
        if abs(value) < step or prefix == "G":
            return f"{value:.0f}{unit}" if prefix == "" else f"{value:.1f}{prefix}{unit}"
        value /= step
    return f"{value}"


def ratio_text(ratio: float) -> str:
    """A ratio with 3 significant digits and at least 2 decimals: ``3.40``, ``0.00256``, never ``0.00``."""
    return f"{ratio:.{_decimals(ratio, 3)}f}"


def with_ratio(value: Any, base: Any, kind: str, noisy: bool = False) -> str:
    """The figure followed by its ratio to the baseline, e.g. ``100.9kB (3.40x)``; ``~`` marks a noisy one."""
    # The ratio is baseline / value: above 1 means smaller, fewer or faster than the baseline.
    text = format_figure(value, kind, noisy)
    if not (value and base):
        return text
    return f"{text} ({ratio_text(base / value)}x{'~' if noisy else ''})"


def with_delta(value: Any, base: Any, is_baseline: bool) -> str:
    """The task metric followed by its change from the baseline, e.g. ``96.67 (+0.56)`` or ``0.9440 (-0.0330)``.

    The metric shows at least 4 significant digits (and 2 decimals); the change as many decimals as
    the metric, more where a small change would otherwise read as zero.
    """
    text = format_figure(value, "metric")
    if is_baseline or value is None or base is None or text == "-":
        return text
    change = value - base
    decimals = max(_decimals(value, 4), _decimals(change, 2) if change else 0)
    return f"{text} ({change:+.{decimals}f})"
