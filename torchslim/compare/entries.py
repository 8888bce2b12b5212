"""A comparison's entries (one per recipe or sweep variant) and how they were run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine import names
from ..engine.report import Report


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

    def describe(self) -> str:
        """One line for the printed output and the reports."""
        threads = (f"torch threads: {_listed(self.work_threads)} outside timing (each recipe's threads), "
                   f"{_listed(self.timing_threads)} while timing (its metrics.threads)")
        if self.jobs == 1:
            return f"mode: sequential, one variant at a time; {threads}"
        return (f"mode: {self.jobs} parallel jobs on {self.cores} cores, at most {self.threads} torch thread(s) each; "
                f"{threads}; the latency of variants run in parallel is disturbed by the jobs beside them "
                f"(use --jobs 1 to time cleanly)")


def _listed(counts: tuple[int, ...]) -> str:
    """``1``, or ``1 or 2`` when the recipes differ; ``as each recipe says`` when not known."""
    return " or ".join(map(str, counts)) or "as each recipe says"
