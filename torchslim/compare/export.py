"""The comparison's files: JSON, CSV, Markdown, a self-contained HTML page and the PNG plot.

Every file is written atomically: an interrupted comparison never leaves half of one.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import IO, Any

from ..engine import names
from ..engine.atomic import write_text, write_with
from .plot import PLOT_HINT, plot_png
from .table import Comparison, Entry

PNG = "comparison.png"
EXPORT_FILES = ("comparison.json", "comparison.csv", "comparison.md", "comparison.html", PNG)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr.baseline td { font-style: italic; background: #fafafa; }
tr.best td { background: #e6f4e6; font-weight: 600; }
tr.failed td { color: #a00; }
ul { line-height: 1.5; }
img { max-width: 100%; margin-top: 1em; border: 1px solid #ddd; }
"""


def write_outputs(comparison: Comparison, out_dir: Path) -> None:
    """Write the plot (when matplotlib is installed), then every file naming it, into ``out_dir``: all made
    from the comparison first, then written one after another."""
    png = plot_png(comparison)
    comparison.plot = PNG if png is not None else f"no plot: matplotlib is not installed; {PLOT_HINT} for {PNG}"
    texts = {
        "comparison.json": json.dumps({**comparison.to_dict(), "plot": comparison.plot}, indent=2) + "\n",
        "comparison.csv": to_csv(comparison),
        "comparison.md": to_markdown(comparison),
        "comparison.html": to_html(comparison, png),
    }
    if png is not None:
        _write_bytes(out_dir / PNG, png)
    else:
        (out_dir / PNG).unlink(missing_ok=True)  # an old plot would no longer match the table
    for name, text in texts.items():
        write_text(out_dir / name, text)


def written_line(comparison: Comparison) -> str:
    """What ``torchslim compare --out`` tells the user it wrote."""
    files = ", ".join(f for f in EXPORT_FILES if f != PNG or comparison.plot == PNG)
    plot = "" if comparison.plot == PNG else f"\n{comparison.plot}"
    return f"wrote {comparison.out}/{files} and one report directory per variant{plot}"


def _write_bytes(path: Path, data: bytes) -> None:
    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    write_with(path, write)


def to_csv(comparison: Comparison) -> str:
    """One line per baseline (torch, then each runtime's float32) and per variant: raw figures, ratios to
    the torch baseline, fronts, budget, and for a deployed variant its ratios to its runtime's baseline."""
    metric = comparison.metric
    keys = [names.SIZE_BYTES, names.PACKED_BYTES, names.MACS, names.LATENCY_MS, metric]
    ratio_keys = [names.SIZE_BYTES, names.PACKED_BYTES, names.MACS, names.LATENCY_MS, f"{metric}_change"]
    runtime_keys = [names.SIZE_BYTES, names.LATENCY_MS, f"{metric}_change"]
    ratio_columns = {f"ratio_{k}": k for k in ratio_keys}
    runtime_columns = {f"runtime_ratio_{k}": k for k in runtime_keys}
    header = [
        "variant",
        "recipe",
        "status",
        "baseline",
        "values",
        *keys,
        "seconds",
        *ratio_columns,
        "pareto_size",
        "pareto_latency",
        "passes",
        "budget_misses",
        names.RUNTIME,
        "runtime_baseline",
        *runtime_columns,
    ]
    out = io.StringIO()
    # A row names its cells; the ones it does not have (a baseline has no ratios) are written empty.
    writer = csv.DictWriter(out, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    for group, row in enumerate(comparison.baselines):
        writer.writerow(
            {"variant": comparison.baseline_label(group), "status": "baseline", **{k: _cell(row.metrics.get(k)) for k in keys}}
        )
    for baseline in comparison.runtime_baselines:
        figures, ratios = baseline.row.metrics if baseline.row else {}, comparison.baseline_ratios(baseline) or {}
        writer.writerow(
            {
                "variant": baseline.label,
                "status": "baseline" if baseline.row else "baseline not measured",
                "baseline": comparison.baseline_label(baseline.group),
                **{k: _cell(figures.get(k)) for k in keys},
                **{c: _cell(ratios.get(k)) for c, k in ratio_columns.items()},
                names.RUNTIME: _cell(figures.get(names.RUNTIME)),
            }
        )
    for entry in comparison.entries:
        figures, ratios, runtime = entry.final or {}, comparison.ratios(entry) or {}, comparison.runtime_ratios(entry) or {}
        runtime_base = comparison.runtime_of(entry)
        writer.writerow(
            {
                "variant": entry.name,
                "recipe": entry.source,
                "status": comparison.status(entry),
                "baseline": comparison.baseline_label(entry.group),
                "values": json.dumps(entry.values),
                **{k: _cell(figures.get(k)) for k in keys},
                "seconds": _cell(entry.seconds),
                **{c: _cell(ratios.get(k)) for c, k in ratio_columns.items()},
                "pareto_size": "size" in entry.fronts,
                "pareto_latency": "latency" in entry.fronts,
                "passes": _cell(None if entry.failures is None else not entry.failures),
                "budget_misses": "; ".join(entry.failures or []),
                names.RUNTIME: _cell(figures.get(names.RUNTIME)),
                "runtime_baseline": _cell(runtime_base.label if runtime_base else None),
                **{c: _cell(runtime.get(k)) for c, k in runtime_columns.items()},
            }
        )
    return out.getvalue()


def _cell(value: Any) -> Any:
    return "" if value is None else value


def to_markdown(comparison: Comparison) -> str:
    """A Markdown page: the table, the summary lines and the plot."""
    lines = "".join(f"- {line}\n" for line in comparison.summary_lines())
    plot = f"\n![{comparison.metric} against size and latency]({PNG})\n" if comparison.plot == PNG else f"\n{comparison.plot}\n"
    return f"# torchslim comparison\n\n{comparison.table('github')}\n\n{lines}{plot}"


def to_html(comparison: Comparison, png: bytes | None) -> str:
    """A self-contained HTML page: inline CSS, the table, the summary and the plot as a data URI."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in comparison.headers())
    rows = "\n".join(_html_row(cells, css) for cells, css in zip(comparison.cells(), _row_classes(comparison), strict=True))
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in comparison.summary_lines())
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        plot = f'<img alt="{html.escape(comparison.metric)} against size and latency" src="data:image/png;base64,{data}">'
    else:
        plot = f"<p>{html.escape(comparison.plot or '')}</p>"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>torchslim comparison</title>'
        f"<style>{_CSS}</style></head>\n<body><h1>torchslim comparison</h1>\n"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n{rows}\n</tbody></table>\n"
        f"<ul>{summary}</ul>\n{plot}\n</body></html>\n"
    )


def _row_classes(comparison: Comparison) -> list[str]:
    baselines = len(comparison.baselines) + len(comparison.runtime_baselines)
    return ["baseline"] * baselines + [_entry_class(e, comparison.best) for e in comparison.entries]


def _entry_class(entry: Entry, best: str | None) -> str:
    return "failed" if entry.error else ("best" if entry.name == best else "")


def _html_row(cells: list[str], css: str) -> str:
    body = "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
    return f'<tr class="{css}">{body}</tr>' if css else f"<tr>{body}</tr>"
