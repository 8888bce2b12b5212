"""What a benchmark case produces: rows of figures, targets, a printed table and a JSON file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

#: The column groups every timed case's table shares (key, header): one place to rename a header.
SIZE_COLUMNS = [("size", "size"), ("size_x", "x smaller")]
LATENCY_COLUMNS = [("latency_ms", "latency ms"), ("speed_x", "x faster"), ("speed_min_x", "x faster (min)")]
ACCURACY_COLUMNS = [("accuracy", "accuracy %"), ("accuracy_change", "change")]


@dataclass
class Target:
    """One goal of the issue, checked against a measured figure (reported, never asserted in CI)."""

    name: str
    value: float
    goal: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        """Whether the measured value reaches the goal."""
        if math.isnan(self.value):
            return False
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def text(self) -> str:
        """``size x >= 8: 13.2 (met)``."""
        sign = ">=" if self.higher_is_better else "<="
        return f"{self.name} {sign} {self.goal:g}: {self.value:.3g} ({'met' if self.met else 'MISSED'})"


@dataclass
class CaseResult:
    """One case: a baseline row, a row per variant, the goals, and how it was measured."""

    case: str
    title: str
    columns: list[tuple[str, str]]
    """(row key, header) of the printed table, in order."""
    rows: list[dict[str, Any]]
    targets: list[Target] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def table(self, fmt: str = "simple") -> str:
        """The rows as a text (or Markdown, ``fmt="github"``) table."""
        if self.skipped:
            return f"skipped: {self.skipped}"
        body = [[format_cell(row.get(key), key) for key, _ in self.columns] for row in self.rows]
        return tabulate(body, headers=[h for _, h in self.columns], tablefmt=fmt, disable_numparse=True)

    def text(self) -> str:
        """Title, table, targets and notes, as printed."""
        lines = [f"== {self.case}: {self.title}", self.table()]
        lines += [f"target: {t.text()}" for t in self.targets]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (targets with their ``met`` flag)."""
        data = asdict(self)
        data["targets"] = [{**asdict(t), "met": t.met} for t in self.targets]
        data["columns"] = [list(c) for c in self.columns]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseResult:
        """The inverse of :meth:`to_dict` (to rebuild the summary from the JSON files)."""
        fields = {
            **data,
            "columns": [tuple(c) for c in data["columns"]],
            "targets": [Target(t["name"], t["value"], t["goal"], t["higher_is_better"]) for t in data["targets"]],
        }
        return cls(**fields)

    def write(self, folder: Path) -> Path:
        """Write ``<folder>/<case>.json`` and return its path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.case}.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n", encoding="utf-8")
        return path


def markdown(results: list[CaseResult]) -> str:
    """Every case as a Markdown section: its table, targets, notes and environment."""
    parts = []
    for result in results:
        parts.append(f"### {result.case}: {result.title}\n")
        if result.skipped:
            parts.append(f"skipped: {result.skipped}\n")
            continue
        parts.append(result.table("github") + "\n")
        parts += [f"- target: {t.text()}" for t in result.targets]
        parts += [f"- {note}" for note in result.notes]
        env = result.environment
        parts.append(
            f"- measured {env.get('date')}: {env.get('cpu')}, {env.get('cpu_count')} cores, torch {env.get('torch')}, "
            f"{env.get('threads')} threads, {env.get('mode')} mode, load average {env.get('load_average_1min')} "
            f"at the end; case took {result.settings.get('case_seconds')}s\n"
        )
    return "\n".join(parts)


def format_cell(value: Any, key: str = "") -> str:
    """A table cell: ratios (``*_x``) as ``2.50x``, changes (``*_change``) signed, the rest to 2-4 places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if key.endswith("_x"):
        return f"{value:.2f}x"
    if key.endswith("_change"):
        return f"{value:+.4f}" if key.startswith("cosine") else f"{value:+.2f}"
    if key == "cosine":
        return f"{value:.4f}"
    if key == "accuracy":
        return f"{value:.2f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def kilobytes(size: int) -> str:
    """``1,689.7 kB``."""
    return f"{size / 1000:,.1f} kB"


def ratio(base: float, value: float) -> float:
    """``base / value``: above 1 means smaller or faster than the baseline."""
    return base / value if value else math.nan
