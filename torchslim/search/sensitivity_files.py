"""What ``torchslim sensitivity`` prints and writes: the table (unit x setting -> loss), sensitivity.json,
sensitivity.md and sensitivity.png, each with the knapsack's allocation under the stage's own budget."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..compare.plot import PLOT_HINT
from ..engine.atomic import write_text
from .allocation import allocate, stage_options, total
from .sensitivity import Probe, Sensitivity, StageSensitivity

SENSITIVITY_JSON, SENSITIVITY_MD, SENSITIVITY_PNG = "sensitivity.json", "sensitivity.md", "sensitivity.png"
#: Lines drawn in a panel of the plot: the units that lose most at their harshest setting.
_PLOTTED = 12


def knapsack(sens: StageSensitivity) -> dict[str, Any] | None:
    """The allocation of least summed squared error within the budget of the stage as written (None: none fits)."""
    options, capacity = stage_options(sens)
    chosen = allocate(options, capacity)
    if chosen is None or sens.unit_setting != "bits":
        return chosen
    return {u: int(b) for u, b in chosen.items()}  # layer_bits takes whole numbers


def predicted_error(sens: StageSensitivity, allocation: dict[str, Any]) -> float:
    """The allocation's output error as the additive model predicts it (square root of the summed squares)."""
    options, _ = stage_options(sens)
    return math.sqrt(total(options, allocation, "loss"))


def cell(probe: Probe | None) -> str:
    """``2.41% / 0.8`` (output error / points of top-class disagreement), ``failed`` or ``-``."""
    if probe is None:
        return "-"
    if probe.error is None:
        return "failed"
    agree = "" if probe.disagreement is None else f" / {probe.disagreement:.2f}"
    return f"{100 * probe.error:.2f}%{agree}"


def stage_table(sens: StageSensitivity, fmt: str = "simple") -> str:
    """One row per unit, one column per setting, and the knapsack's choice."""
    chosen = knapsack(sens) or {}
    headers = [sens.unit_kind, *(f"{sens.unit_setting} {s:g}" for s in sens.settings), "knapsack"]
    rows = [[u, *(cell(sens.probe(u, s)) for s in sens.settings), _setting(chosen.get(u))] for u in sens.units]
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


def stage_lines(sens: StageSensitivity) -> list[str]:
    """The stage as written, the knapsack's allocation, the failures and the cost."""
    chosen = knapsack(sens)
    lines = [f"as written ({sens.unit_setting} {sens.uniform.setting:g} for every {sens.unit_kind}): {cell(sens.uniform)}"]
    if chosen is None:
        lines.append("knapsack: no allocation of the measured settings fits the budget of the stage as written")
    else:
        lines.append(
            f"knapsack within the budget of the stage as written: predicted output error "
            f"{100 * predicted_error(sens, chosen):.2f}% (summed in quadrature); {sens.unit_option}: "
            f"{json.dumps(chosen)}"
        )
    lines += [f"failed: {p.unit} at {p.setting:g}: {p.failed}" for p in sens.probes if p.failed]
    how = "read from the cache" if sens.cached else "measured"
    lines.append(f"{how}: {sens.seconds:.1f} s to measure")
    return lines


def text(result: Sensitivity) -> str:
    """The whole pass as the terminal shows it."""
    parts = [
        f"sensitivity of {result.recipe}: {result.metric_note}, {result.batches} batch(es), {result.samples} "
        "samples; cells: relative output error / points of top-class disagreement"
    ]
    for sens in result.stages:
        parts += [f"\nstage {sens.stage} ({sens.label}): per {sens.unit_kind}", stage_table(sens)]
        parts += [f"  {line}" for line in stage_lines(sens)]
    parts.append(f"\ncost: {result.seconds:.1f} s")
    return "\n".join(parts)


def write_files(out: Path, result: Sensitivity) -> list[Path]:
    """sensitivity.json, .md and .png (the png when matplotlib is installed) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / SENSITIVITY_JSON, json.dumps(to_json(result), indent=2) + "\n")
    png = plot_png(result)
    written = [out / SENSITIVITY_JSON, out / SENSITIVITY_MD]
    if png is not None:
        (out / SENSITIVITY_PNG).write_bytes(png)
        written.append(out / SENSITIVITY_PNG)
    write_text(out / SENSITIVITY_MD, markdown(result, png is not None))
    return written


def to_json(result: Sensitivity) -> dict[str, Any]:
    """sensitivity.json: every probe, the knapsack's allocation, the cost in seconds."""
    return {
        "recipe": result.recipe,
        "measure": result.metric_note,
        "batches": result.batches,
        "samples": result.samples,
        "seconds": round(result.seconds, 3),
        "stages": [{**s.to_json(), "knapsack": knapsack(s)} for s in result.stages],
    }


def markdown(result: Sensitivity, plotted: bool) -> str:
    """sensitivity.md: a table per stage, its allocation, the plot."""
    parts = [
        f"# Sensitivity of {result.recipe}\n",
        f"{result.metric_note}: {result.batches} batch(es), {result.samples} "
        f"samples. Cells: relative output error / points of top-class disagreement. Cost: {result.seconds:.1f} s.\n",
    ]
    for sens in result.stages:
        parts += [f"## Stage {sens.stage} ({sens.label}), per {sens.unit_kind}\n", stage_table(sens, "github") + "\n"]
        parts += [f"- {line}" for line in stage_lines(sens)] + [""]
    parts.append(f"![sensitivity]({SENSITIVITY_PNG})" if plotted else f"no plot: matplotlib is not installed ({PLOT_HINT})")
    return "\n".join(parts) + "\n"


def plot_png(result: Sensitivity) -> bytes | None:
    """Output error against the setting, one line per unit, a panel per stage (None without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(6 * max(1, len(result.stages)), 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    for index, sens in enumerate(result.stages, 1):
        axes = figure.add_subplot(1, len(result.stages), index)
        for unit in _worst(sens):
            points = [(s, 100 * p.error) for s in sens.settings if (p := sens.probe(unit, s)) and p.error is not None]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=unit)
        axes.set_xlabel(sens.unit_setting)
        axes.set_ylabel("output error (%)")
        axes.set_title(f"{sens.label}: per {sens.unit_kind}")
        axes.set_yscale("symlog", linthresh=0.1)
        axes.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _worst(sens: StageSensitivity) -> list[str]:
    harshest = sens.settings[0] if sens.unit_setting == "bits" else sens.settings[-1]
    return sorted(sens.units, key=lambda u: -(((p := sens.probe(u, harshest)) and p.error) or 0.0))[:_PLOTTED]


def _setting(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
