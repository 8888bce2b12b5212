"""The comparison's plot: the metric against size and against latency, Pareto fronts drawn.

matplotlib is an optional extra (``pip install 'torchslim[plot]'``); it is used through its
object API with the Agg canvas, so making the plot changes no global matplotlib state. Points
are numbered and named in a key under the panels: variant names are long and variants often
sit on top of each other (same size after int8), so names beside the points would overlap.
"""

from __future__ import annotations

import io
import math
from typing import Any

from ..engine import names
from .budget import MB
from .table import Comparison

PLOT_HINT = "pip install 'torchslim[plot]'"
#: Panels: (metric key, x-axis label, scale of the value on the axis).
_PANELS = [(names.SIZE_BYTES, "size on disk (kB)", 1e-3), (names.LATENCY_MS, "latency (ms, median)", 1.0)]
_FRONT, _OFF = "tab:blue", "tab:gray"
_RUNTIME_COLOURS = ("tab:orange", "tab:green", "tab:purple")
#: Characters of a key line that fit its half of the figure (8-point monospace, 12 inches wide).
KEY_WIDTH = 86


def plot_png(comparison: Comparison, heading: str = "torchslim comparison") -> bytes | None:
    """The PNG of the plot, titled ``heading`` (a search plots its trials), or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    key_rows = math.ceil(len(comparison.entries) / 2)
    key_height = 0.3 + 0.17 * key_rows
    figure = Figure(figsize=(12, 5 + key_height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, height_ratios=[5, key_height])
    for column, (key, label, scale) in enumerate(_PANELS):
        _panel(figure.add_subplot(grid[0, column]), comparison, key, label, scale)
    _key(figure.add_subplot(grid[1, :]), comparison, key_rows)
    title = f"{heading}: {comparison.metric} against size and latency"
    if comparison.mode.jobs > 1:
        title += f"\n(latency timed under {comparison.mode.jobs} parallel jobs: disturbed by each other)"
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _panel(axes: Any, comparison: Comparison, key: str, label: str, scale: float) -> None:
    metric = comparison.metric
    cost = "size" if key == names.SIZE_BYTES else "latency"
    points = [
        (number, e, m[key] * scale, m[metric])
        for number, e in enumerate(comparison.entries, 1)
        if (m := e.final) is not None and _has(m, key, metric)
    ]
    for number, entry, x, y in points:
        on = cost in entry.fronts
        axes.scatter([x], [y], s=46 if on else 30, marker="x" if entry.failures else "o", color=_FRONT if on else _OFF, zorder=3)
        axes.annotate(str(number), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    front = sorted((x, y) for _, e, x, y in points if cost in e.fronts)
    if front:
        axes.step(
            [x for x, _ in front],
            [y for _, y in front],
            where="post",
            color=_FRONT,
            linewidth=1.2,
            label=f"Pareto front ({metric} vs {cost})",
        )
    _baselines(axes, comparison, key, scale)
    _limits(axes, comparison, key)
    _clip_outliers(axes, [(number, x, y, _FRONT if cost in e.fronts else _OFF) for number, e, x, y in points])
    _legend_markers(axes, comparison)
    _axes_style(axes, [x for _, _, x, _ in points], f"{label} (lower is better)", f"{metric} (higher is better)")


def _baselines(axes: Any, comparison: Comparison, key: str, scale: float) -> None:
    for index, row in enumerate(comparison.baselines):
        if _has(row.metrics, key, comparison.metric):
            x, y = row.metrics[key] * scale, row.metrics[comparison.metric]
            axes.scatter([x], [y], marker="*", s=140, color="black", zorder=4, label="baseline" if index == 0 else None)
            if len(comparison.baselines) > 1:
                axes.annotate(f"B{index + 1}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
    # Each runtime's float32 baseline as a hollow star: the variants deployed there are measured against it too.
    for index, baseline in enumerate(comparison.runtime_baselines):
        metrics = baseline.row.metrics if baseline.row is not None else None
        if metrics is not None and _has(metrics, key, comparison.metric):
            colour = _RUNTIME_COLOURS[index % len(_RUNTIME_COLOURS)]
            axes.scatter(
                [metrics[key] * scale],
                [metrics[comparison.metric]],
                marker="*",
                s=140,
                facecolors="none",
                edgecolors=colour,
                zorder=4,
                label=f"float32 in {baseline.runtime}",
            )


def _limits(axes: Any, comparison: Comparison, key: str) -> None:
    """Dashed lines at the budget's limits on this panel's axes."""
    limits = comparison.constraints.given() if comparison.constraints else {}
    x_limit = {names.SIZE_BYTES: limits.get("max_size_mb", 0) * MB * 1e-3, names.LATENCY_MS: limits.get("max_latency_ms", 0)}[key]
    if x_limit:
        axes.axvline(x_limit, color="tab:red", linestyle="--", linewidth=1, label="budget limit")
    floors = [limits["min_accuracy"]] if "min_accuracy" in limits else []
    base = comparison.baselines[0].metrics.get(comparison.metric) if comparison.baselines else None
    if "max_accuracy_drop" in limits and isinstance(base, (int, float)) and len(comparison.baselines) == 1:
        floors.append(base - limits["max_accuracy_drop"])
    if floors:
        axes.axhline(max(floors), color="tab:red", linestyle="--", linewidth=1, label=None if x_limit else "budget limit")


def _clip_outliers(axes: Any, points: list[tuple[int, float, float, str]]) -> None:
    """Keep the interesting band readable: a variant that collapsed (far below the others) is
    drawn as an arrow at the bottom edge with its value, instead of squashing every other point."""
    ys = sorted(y for _, _, y, _ in points)
    if len(ys) < 4:
        return
    spread = ys[-1] - ys[len(ys) // 4]
    bottom = ys[-1] - 4 * spread
    if spread <= 0 or ys[0] >= bottom:
        return
    top = axes.get_ylim()[1]
    axes.set_ylim(bottom, top)
    for number, x, y, colour in points:
        if y < bottom:
            edge = bottom + 0.02 * (top - bottom)
            axes.scatter([x], [edge], marker="v", color=colour, zorder=3)
            axes.annotate(f"{number}: {y:.1f}", (x, edge), textcoords="offset points", xytext=(5, 3), fontsize=8)


def _legend_markers(axes: Any, comparison: Comparison) -> None:
    # Empty scatters only put the marker meanings into the legend.
    axes.scatter([], [], marker="o", color=_OFF, label="off the front")
    if comparison.constraints is not None:
        axes.scatter([], [], marker="x", color=_OFF, label="misses the budget")


def _axes_style(axes: Any, xs: list[float], xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if xs and min(xs) > 0 and max(xs) / min(xs) > 8:
        axes.set_xscale("log")  # sizes span orders of magnitude once distillation shrinks the model
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)


def _key(axes: Any, comparison: Comparison, rows: int) -> None:
    """The names of the numbered points, in two columns."""
    axes.axis("off")
    lines = key_lines(comparison)
    if len(comparison.baselines) > 1:
        rows = math.ceil(len(lines) / 2)
    for column in range(2):
        axes.text(
            0.5 * column,
            1.0,
            "\n".join(lines[column * rows : (column + 1) * rows]),
            va="top",
            ha="left",
            fontsize=8,
            family="monospace",
            transform=axes.transAxes,
        )


def key_lines(comparison: Comparison) -> list[str]:
    """The key's lines: each point's number and name (and each baseline's, when there are several), each cut to
    what its column holds: a line past it runs into the next column and squeezes the panels (the table has it whole)."""
    lines = [
        f"{number:>2}  {entry.name}" + ("  (failed)" if entry.error else "") for number, entry in enumerate(comparison.entries, 1)
    ]
    if len(comparison.baselines) > 1:
        lines += [f"B{i + 1}  {comparison.baseline_label(i)}" for i in range(len(comparison.baselines))]
    return [line if len(line) <= KEY_WIDTH else line[: KEY_WIDTH - 3] + "..." for line in lines]


def _has(metrics: dict[str, Any] | None, *keys: str) -> bool:
    return metrics is not None and all(isinstance(metrics.get(k), (int, float)) for k in keys)
