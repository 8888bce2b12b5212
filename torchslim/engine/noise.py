"""When a latency is noise: the rules that mark a figure (``0.13~``) instead of printing it as fact.

A latency, or a ratio of two, is marked noisy when

- the machine was busy while it was timed: other processes' runnable tasks plus the timing's
  torch threads outnumbered the CPUs (the timing then waited for a core), or the 1-minute load
  average when the run started was above the CPU count;
- or its runs spread too widely: the interquartile range is more than half the median (for a
  speed-up, the quartiles of the per-round ratios), so that a ratio between two such figures
  cannot be told from the spread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import names

#: The interquartile range, relative to the median, above which a timing is too spread to compare.
MAX_SPREAD = 0.5


def latency_noise(metrics: Mapping[str, Any], environment: Mapping[str, Any]) -> str | None:
    """Why a row's latency is noisy (its words for a note), or None when it is not."""
    median, iqr = metrics.get(names.LATENCY_MS), metrics.get(names.LATENCY_IQR_MS)
    busy = _busy(metrics.get(names.LATENCY_OTHERS), environment)
    if busy:
        return busy
    if median and iqr is not None and iqr > MAX_SPREAD * median:
        return f"its runs spread over {iqr / median:.0%} of the median (interquartile range)"
    return _loaded(environment)


def opposed_directions(speedup: Mapping[str, Any]) -> str | None:
    """Where the median of the per-round ratios and the ratio of the median times disagree on which model is
    faster (one above 1, the other below), the two figures in words; else None."""
    ratio, base, final = speedup.get("ratio"), speedup.get("baseline_ms"), speedup.get("final_ms")
    if not ratio or not base or not final or (ratio - 1) * (base / final - 1) >= 0:
        return None
    return (
        f"the median of the per-round ratios is {ratio:.3g}x ({'faster' if ratio > 1 else 'slower'}) but the ratio "
        f"of the median times is {base / final:.3g}x ({'faster' if base > final else 'slower'})"
    )


def speedup_noise(speedup: Mapping[str, Any], environment: Mapping[str, Any]) -> str | None:
    """Why the run's interleaved speed-up is noisy, or None."""
    opposed = opposed_directions(speedup)
    if opposed:
        return opposed
    busy = _busy(speedup.get("others_running"), environment)
    if busy:
        return busy
    ratio, q1, q3 = speedup.get("ratio"), speedup.get("q1"), speedup.get("q3")
    if ratio and q1 is not None and q3 is not None and q3 - q1 > MAX_SPREAD * ratio:
        return f"the per-round ratios spread from {q1:.3g}x to {q3:.3g}x (interquartile range)"
    return _loaded(environment)


def _busy(others: Any, environment: Mapping[str, Any]) -> str | None:
    threads, cpus = environment.get("threads"), environment.get("cpus")
    if others is None or not threads or not cpus or others + threads <= cpus:
        return None
    return f"{others:g} other runnable task(s) (median) while it was timed with {threads} torch thread(s) on {cpus} CPU(s)"


def _loaded(environment: Mapping[str, Any]) -> str | None:
    load, cpus = environment.get("load_before"), environment.get("cpus")
    if load is None or not cpus or load <= cpus:
        return None
    return f"the 1-minute load average was {load:g} when the run started, above the {cpus} CPU(s)"
