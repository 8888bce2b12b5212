"""What a comparison produced (its entries, how they ran, the comparison), and its table: one row per
recipe or sweep variant, ratios to the baseline.

Variants deployed to a runtime get a second ratio, to the original model deployed to the same
runtime in float32 (:mod:`.runtimes`): the table shows that baseline's row and a column of those ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..engine import names
from ..engine.noise import latency_noise
from ..engine.report import Report, Row, format_figure, ratio_text, with_delta, with_ratio
from .budget import Budget
from .runtimes import NOT_MEASURED, RuntimeBaseline, version_lines

__all__ = ["Comparison", "Entry", "Mode"]

#: Columns with a ratio to the baseline: (metric key, header, formatter kind, baseline key of the ratio).
#: A packed file is compared with the baseline's dense file: the one a user would ship uncompressed.
_COLUMNS = [
    (names.SIZE_BYTES, "size (x smaller)", "bytes", names.SIZE_BYTES),
    (names.PACKED_BYTES, "packed (x smaller)", "bytes", names.SIZE_BYTES),
    (names.MACS, "MACs (x fewer)", "count", names.MACS),
    (names.LATENCY_MS, "latency ms (x faster)", "ms", names.LATENCY_MS),
]
#: The column of ratios to the runtime's float32 baseline, shown when a variant is deployed.
_RUNTIME_HEADER = "vs runtime fp32 (x smaller, x faster)"


@dataclass
class Entry:
    """One compared recipe or sweep variant, and how it came out."""

    name: str
    folder: str
    source: str
    values: dict[str, Any]
    group: int
    """Index of its baseline in :attr:`Comparison.baselines`."""
    runtime_base: int | None = None
    """Index of its float32 baseline in its runtime in :attr:`Comparison.runtime_baselines` (None: not deployed)."""
    report: Report | None = None
    error: str | None = None
    """Why it failed (it is then left out of the fronts and the budget)."""
    exit_code: int = 0
    reused: bool = False
    """Its report was read from a previous run of the same resolved recipe."""
    fronts: list[str] = field(default_factory=list)
    failures: list[str] | None = None
    """Budget misses (empty: passes); None without constraints or when it failed."""

    @property
    def final(self) -> dict[str, Any] | None:
        """Metrics after the last stage (None for a failed variant)."""
        return self.report.final.metrics if self.report is not None else None

    @property
    def seconds(self) -> float | None:
        """Total time of its stages (model building and the baseline aside)."""
        if self.report is None:
            return None
        return float(sum(row.metrics.get(names.SECONDS) or 0.0 for row in self.report.rows[1:]))


@dataclass
class Mode:
    """How the variants were run: in one process, or in parallel jobs with threads divided."""

    jobs: int
    cores: int
    threads: int | None
    """Torch threads per job under parallel jobs (None: each recipe's own setting)."""
    work_threads: tuple[int, ...] = ()
    """The torch threads the variants used outside timing (each recipe's ``threads``, resolved), distinct, sorted."""
    timing_threads: tuple[int, ...] = ()
    """The torch threads the variants were timed with (each recipe's ``metrics.threads``, resolved)."""
    executor: str | None = None
    """Where the variants ran when not in this machine's processes (``--executor ray``), in words."""

    def describe(self) -> str:
        """One line for the printed output and the reports."""
        threads = (
            f"torch threads: {_listed(self.work_threads)} outside timing (each recipe's threads), "
            f"{_listed(self.timing_threads)} while timing (its metrics.threads)"
        )
        if self.executor is not None:
            return f"mode: {self.executor}; {threads}; the latency of variants run side by side is disturbed"
        if self.jobs == 1:
            return f"mode: sequential, one variant at a time; {threads}"
        return (
            f"mode: {self.jobs} parallel jobs on {self.cores} cores, at most {self.threads} torch thread(s) each; "
            f"{threads}; the latency of variants run in parallel is disturbed by the jobs beside them "
            f"(use --jobs 1 to time cleanly)"
        )


def _listed(counts: tuple[int, ...]) -> str:
    """``1``, or ``1 or 2`` when the recipes differ; ``as each recipe says`` when not known."""
    return " or ".join(map(str, counts)) or "as each recipe says"


@dataclass
class Comparison:
    """Every entry of a comparison with its baseline, fronts, budget verdict and best passing one."""

    metric: str
    entries: list[Entry]
    baselines: list[Row]
    groups: list[list[str]]
    """Names of the entries sharing each baseline."""
    mode: Mode
    constraints: Budget | None = None
    best: str | None = None
    chosen_on: str | None = None
    """Which data chose :attr:`best`: ``validation`` (every passing variant has a validation score) or
    ``eval`` (the data the table reports: the choice and the figure are then not independent)."""
    baselines_measured: int = 0
    """Baselines measured in this run (the others came from reused reports)."""
    out: Path | None = None
    plot: str | None = None
    """What became of the plot: the PNG's path, or how to get it."""
    runtime_baselines: list[RuntimeBaseline] = field(default_factory=list)
    """The original model in float32 in each runtime a variant is deployed to."""
    runtime_baselines_measured: int = 0
    """Runtime baselines measured in this run (the others came from reused reports, or failed)."""

    @property
    def exit_code(self) -> int:
        """0 when every entry ran, else the highest exit code of a failed one."""
        return max((e.exit_code for e in self.entries), default=0)

    def headers(self) -> list[str]:
        """Column titles of the table."""
        budget = ["budget"] if self.constraints is not None else []
        runtime = [_RUNTIME_HEADER] if self.runtime_baselines else []
        return ["variant", *(h for _, h, _, _ in _COLUMNS), *runtime, f"{self.metric} (change)", "seconds", "Pareto", *budget]

    def cells(self) -> list[list[str]]:
        """The table's body: the baselines (torch, then each runtime's), then one line per entry."""
        lines = [self._baseline_cells(i, row) for i, row in enumerate(self.baselines)]
        lines += [self._runtime_baseline_cells(b) for b in self.runtime_baselines]
        return lines + [self._entry_cells(entry) for entry in self.entries]

    def table(self, fmt: str = "simple") -> str:
        """The comparison table, formatted by tabulate."""
        return tabulate(self.cells(), headers=self.headers(), tablefmt=fmt, disable_numparse=True, colalign=("left",))

    def baseline_label(self, group: int) -> str:
        """``baseline``, or with several models, the baseline of the first recipe using it."""
        return "baseline" if len(self.baselines) == 1 else f"baseline ({self.groups[group][0]})"

    def _baseline_cells(self, group: int, row: Row) -> list[str]:
        noisy = self._noisy(group, row.metrics)
        cells = [
            self.baseline_label(group),
            *(format_figure(row.metrics.get(key), kind, noisy and key == names.LATENCY_MS) for key, _, kind, _ in _COLUMNS),
        ]
        cells += [
            *self._runtime_column("-"),
            format_figure(row.metrics.get(self.metric), "metric"),
            "-",
            "",
            *([""] if self.constraints else []),
        ]
        return cells

    def _runtime_baseline_cells(self, baseline: RuntimeBaseline) -> list[str]:
        """Its figures with their ratios to the torch baseline: what the runtime alone gains."""
        budget = [""] if self.constraints else []
        if baseline.row is None:
            return [baseline.label, *(["-"] * len(_COLUMNS)), NOT_MEASURED, "-", "-", "", *budget]
        final, base = baseline.row.metrics, self.baselines[baseline.group].metrics
        noisy = baseline.noisy() or self._noisy(baseline.group, base)
        return [
            baseline.label,
            *self._ratio_cells(final, base, noisy),
            "-",
            with_delta(final.get(self.metric), base.get(self.metric), False),
            "-",
            "",
            *budget,
        ]

    def _runtime_column(self, cell: str) -> list[str]:
        return [cell] if self.runtime_baselines else []

    def _runtime_cell(self, entry: Entry, final: dict[str, Any]) -> str:
        """``3.78x, 1.67x~``: size and latency ratios to its runtime's float32 baseline; ``-`` for a torch variant."""
        if entry.runtime_base is None:
            return "-"
        baseline = self.runtime_baselines[entry.runtime_base]
        if baseline.row is None:
            return NOT_MEASURED  # never a ratio of 0: the reason is under the table
        ratios = _ratios(final, baseline.row.metrics, self.metric)
        mark = "~" if baseline.noisy() or self._noisy(entry.group, final) else ""
        size, latency = ratios[names.SIZE_BYTES], ratios[names.LATENCY_MS]
        return (
            f"{'-' if size is None else ratio_text(size) + 'x'}, {'-' if latency is None else ratio_text(latency) + 'x' + mark}"
        )

    def _noisy(self, group: int, *figures: dict[str, Any]) -> bool:
        """Whether any of these latencies is noise, judged by the rules of a run's report (engine.noise)."""
        environment = next((e.report.environment for e in self.entries if e.group == group and e.report), {})
        return any(latency_noise(f, environment) for f in figures if f.get(names.LATENCY_MS))

    def _entry_cells(self, entry: Entry) -> list[str]:
        if entry.report is None:
            dashes = len(_COLUMNS) + 2 + len(self._runtime_column("-"))
            return [entry.name, *(["-"] * dashes), "", *(["failed"] if self.constraints else [])]
        final, base = entry.report.final.metrics, self.baselines[entry.group].metrics
        noisy = self._noisy(entry.group, final, base)
        cells = [entry.name, *self._ratio_cells(final, base, noisy), *self._runtime_column(self._runtime_cell(entry, final))]
        cells += [with_delta(final.get(self.metric), base.get(self.metric), False), format_figure(entry.seconds, "float")]
        cells.append(" ".join(entry.fronts))
        if self.constraints is not None:
            cells.append("pass" if not entry.failures else "fail")
        return cells

    def _ratio_cells(self, final: dict[str, Any], base: dict[str, Any], noisy: bool) -> list[str]:
        return [
            with_ratio(final.get(key), base.get(ref), kind, noisy and key == names.LATENCY_MS) for key, _, kind, ref in _COLUMNS
        ]

    def summary_lines(self) -> list[str]:
        """The lines printed under the table: failures, fronts, budget and best, sharing, reuse, mode."""
        lines = [f"failed: {e.name}: {e.error}" for e in self.entries if e.error]
        for cost in ("size", "latency"):
            names = [e.name for e in self.entries if cost in e.fronts]
            lines.append(f"Pareto front, {self.metric} vs {cost}: {', '.join(names) or 'none'}")
        lines += self._budget_lines()
        lines.append(self._baseline_line())
        lines += [baseline.describe() for baseline in self.runtime_baselines]
        lines += version_lines(self.runtime_baselines, {e.name: e.final for e in self.entries if e.final is not None})
        reused = [e.name for e in self.entries if e.reused]
        if reused:
            lines.append(
                f"reused {len(reused)} finished variant(s) (same resolved recipe hash and environment), "
                f"not rerun: {', '.join(reused)}"
            )
        lines.append(self.mode.describe())
        if any(
            self._noisy(e.group, e.report.final.metrics, self.baselines[e.group].metrics) for e in self.entries if e.report
        ) or any(b.noisy() for b in self.runtime_baselines):
            lines.append(
                "~ marks a noisy latency and its ratio (the machine was busy or the runs spread widely, "
                "as each variant's report.json notes say): read it as noise, not as a measurement"
            )
        return lines

    def _baseline_line(self) -> str:
        if self.baselines_measured == 0:
            return "baseline: taken from the reused reports, not measured again"
        shared = (
            ""
            if len(self.baselines) == len(self.entries)
            else ("; variants with the same model, data, evaluate, metrics and seed share one")
        )
        return f"baseline: measured {self.baselines_measured} time(s) for {len(self.entries)} variant(s){shared}"

    def _budget_lines(self) -> list[str]:
        if self.constraints is None:
            return []
        limits = ", ".join(f"{k} {v:g}" for k, v in self.constraints.given().items())
        passing = sum(1 for e in self.entries if e.failures == [])
        lines = [f"budget ({limits}): {passing} of {len(self.entries)} variant(s) pass"]
        lines += [f"  {e.name} misses it: {'; '.join(e.failures)}" for e in self.entries if e.failures]
        lines.append(f"best within the budget: {self._describe_best()}" if self.best else "no variant meets the budget")
        if self.best:
            lines.append(
                f"  chosen on the validation data by validation_{self.metric}; the figures shown are on the eval data"
                if self.chosen_on == "validation"
                else "  chosen and reported on the same eval data (optimistic); a 'validation' loader separates them"
            )
        return lines

    def _describe_best(self) -> str:
        entry = next(e for e in self.entries if e.name == self.best)
        final, base = entry.final or {}, self.baselines[entry.group].metrics
        metric = with_delta(final.get(self.metric), base.get(self.metric), False)
        size = with_ratio(final.get(names.SIZE_BYTES), base.get(names.SIZE_BYTES), "bytes").replace("x)", "x smaller)")
        latency = with_ratio(final.get(names.LATENCY_MS), base.get(names.LATENCY_MS), "float").replace(" (", " ms (", 1)
        return f"{entry.name}: {self.metric} {metric}, size {size}, latency {latency.replace('x)', 'x faster)')}"

    def text(self) -> str:
        """The table and the summary lines, as printed by ``torchslim compare``."""
        return self.table() + "\n" + "\n".join(self.summary_lines())

    def to_dict(self) -> dict[str, Any]:
        """Plain data for comparison.json."""
        return {
            "metric": self.metric,
            "mode": {
                "jobs": self.mode.jobs,
                "cores": self.mode.cores,
                "threads": self.mode.threads,
                "work_threads": list(self.mode.work_threads),
                "timing_threads": list(self.mode.timing_threads),
                "description": self.mode.describe(),
            },
            "constraints": self.constraints.given() if self.constraints else None,
            "best": self.best,
            "best_chosen_on": self.chosen_on,
            "baselines": [
                {"label": self.baseline_label(i), "variants": g, "metrics": dict(row.metrics)}
                for i, (g, row) in enumerate(zip(self.groups, self.baselines, strict=True))
            ],
            "baselines_measured": self.baselines_measured,
            "runtime_baselines": [self._runtime_baseline_dict(b) for b in self.runtime_baselines],
            "runtime_baselines_measured": self.runtime_baselines_measured,
            "variants": [self._entry_dict(e) for e in self.entries],
        }

    def status(self, entry: Entry) -> str:
        """``failed``, ``reused`` (read from a finished run) or ``ran``."""
        return "failed" if entry.error else ("reused" if entry.reused else "ran")

    def ratios(self, entry: Entry) -> dict[str, float | None] | None:
        """The entry's ratios to its torch baseline (None for a failed entry)."""
        final = entry.final
        return _ratios(final, self.baselines[entry.group].metrics, self.metric) if final is not None else None

    def runtime_of(self, entry: Entry) -> RuntimeBaseline | None:
        """The float32 baseline in the entry's runtime (None: not deployed)."""
        return self.runtime_baselines[entry.runtime_base] if entry.runtime_base is not None else None

    def runtime_ratios(self, entry: Entry) -> dict[str, float | None] | None:
        """The entry's ratios to its runtime's float32 baseline (None: not deployed, failed, or that baseline failed)."""
        runtime, final = self.runtime_of(entry), entry.final
        return _ratios(final, runtime.row.metrics, self.metric) if final and runtime and runtime.row else None

    def baseline_ratios(self, baseline: RuntimeBaseline) -> dict[str, float | None] | None:
        """A runtime's float32 baseline against the torch baseline (None when it was not measured)."""
        if baseline.row is None:
            return None
        return _ratios(baseline.row.metrics, self.baselines[baseline.group].metrics, self.metric)

    def _runtime_baseline_dict(self, baseline: RuntimeBaseline) -> dict[str, Any]:
        metrics = baseline.row.metrics if baseline.row is not None else None
        return {
            "label": baseline.label,
            "runtime": baseline.runtime,
            "deploy": baseline.options,
            "variants": baseline.variants,
            "status": baseline.status,
            "error": baseline.error,
            "report_dir": baseline.folder if self.out is not None else None,
            "baseline": self.baseline_label(baseline.group),
            "metrics": dict(metrics) if metrics else None,
            "ratios": self.baseline_ratios(baseline),
            "interleaved_speedup_over_torch": baseline.speedup,
        }

    def _entry_dict(self, entry: Entry) -> dict[str, Any]:
        final, runtime = entry.final, self.runtime_of(entry)
        return {
            "name": entry.name,
            "recipe": entry.source,
            "values": entry.values,
            "report_dir": entry.folder if self.out is not None else None,
            "baseline": self.baseline_label(entry.group),
            "status": self.status(entry),
            "error": entry.error,
            "metrics": dict(final) if final is not None else None,
            "ratios": self.ratios(entry),
            "runtime_baseline": runtime.label if runtime is not None else None,
            "runtime_ratios": self.runtime_ratios(entry),
            "seconds": entry.seconds,
            "pareto": entry.fronts,
            "passes": None if entry.failures is None else not entry.failures,
            "budget_misses": entry.failures,
        }


def _ratios(final: dict[str, Any], base: dict[str, Any], metric: str) -> dict[str, float | None]:
    ratios: dict[str, float | None] = {}
    for key, _, _, ref in _COLUMNS:
        value, reference = final.get(key), base.get(ref)
        ratios[key] = float(reference) / float(value) if value and reference else None
    value, reference = final.get(metric), base.get(metric)
    ratios[f"{metric}_change"] = float(value) - float(reference) if value is not None and reference is not None else None
    return ratios
