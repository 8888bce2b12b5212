"""What every case shares: modes, interleaved timing, running a recipe to a saved-and-loaded model,
and the baseline-versus-variants rows."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchslim
from torchslim import Registry, Report
from torchslim.engine.metrics import size_bytes
from torchslim.engine.recipe import validate
from torchslim.engine.specs import build_data, build_model
from torchslim.engine.yamlio import Document, read_yaml

from .disjoint import checked_spec
from .report import kilobytes, ratio

BENCH_DIR = Path(__file__).resolve().parent
RECIPES = BENCH_DIR / "recipes"


@dataclass(frozen=True)
class Settings:
    """How hard a run measures: ``full`` (the published numbers), ``quick`` (minutes), ``smoke`` (CI)."""

    mode: str
    threads: int = 2
    warmup: int = 10
    """Untimed calls of each variant before timing."""
    rounds: int = 5
    """Timing rounds; in each, every variant runs ``runs`` times, the order rotating between rounds."""
    runs: int = 20
    workdir: Path = Path("bench-work")
    """Where recipes write their outputs (a temporary directory)."""

    @property
    def full(self) -> bool:
        """Whether this is the full mode."""
        return self.mode == "full"


MODES = {
    "full": Settings("full"),
    "quick": Settings("quick", warmup=3, rounds=3, runs=5),
    "smoke": Settings("smoke", warmup=1, rounds=2, runs=2),
}


def settings_for(mode: str, threads: int, workdir: Path) -> Settings:
    """The settings of ``mode`` with the thread count and work directory filled in."""
    return replace(MODES[mode], threads=threads, workdir=workdir)


def pick(settings: Settings, full: Any, quick: Any, smoke: Any) -> Any:
    """The value for the settings' mode."""
    return {"full": full, "quick": quick, "smoke": smoke}[settings.mode]


def interleaved(calls: Mapping[str, Callable[[], Any]], *, warmup: int, rounds: int, runs: int) -> dict[str, list[float]]:
    """Seconds of each timed call, per name: warm-up first, then ``rounds`` rounds in rotating order.

    Interleaving spreads slow spells of a shared machine over every variant instead of
    charging them to whichever ran at that moment.
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(runs):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: Mapping[str, list[float]]) -> dict[str, float]:
    """The median of each list, in milliseconds."""
    return {name: statistics.median(values) * 1000.0 for name, values in times.items()}


def latencies(models: Mapping[str, nn.Module], forward: Callable[[nn.Module], Any], settings: Settings) -> dict[str, list[float]]:
    """Seconds of each timed ``forward(model)`` per model, interleaved, under inference mode."""
    calls = {name: (lambda m=model: forward(m)) for name, model in models.items()}
    with torch.inference_mode():
        return interleaved(calls, warmup=settings.warmup, rounds=settings.rounds, runs=settings.runs)


def load_bench_recipe(path: Path, overrides: Mapping[str, Any] | None = None, checked: bool = True) -> Any:
    """A recipe file with ``overrides`` merged in (the quick modes' smaller settings), validated as
    if read from ``path`` (relative paths in it resolve against its folder). With ``checked``, the run
    builds its data through :func:`bench.disjoint.checked_data`: it stops if an eval sample is also a
    training, calibration or validation sample."""
    data = merge(read_yaml(path).data, overrides or {})
    if checked:
        data["data"] = checked_spec(data["data"])
    return validate(Document(data, str(path)), Registry.load(autoload=False))


def merge(base: Any, overrides: Mapping[str, Any]) -> Any:
    """``base`` with ``overrides`` merged in: mappings key by key, and ``stages`` by position."""
    result = dict(base)
    for key, value in overrides.items():
        old = result.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            result[key] = merge(old, value)
        elif key == "stages" and isinstance(value, Mapping):
            result[key] = [merge(stage, value.get(i, {})) for i, stage in enumerate(old)]
        else:
            result[key] = value
    return result


def compress(recipe: Any, settings: Settings) -> tuple[nn.Module, Report, float]:
    """Run ``recipe`` through ``torchslim.run`` into the work directory, then load the saved model
    the way a user would (``torchslim.load_model``). Returns the model, the report and the seconds."""
    out = settings.workdir / recipe.name
    registry = Registry.load(autoload=False)
    start = time.perf_counter()
    report = torchslim.run(recipe, out, registry=registry, overwrite=True)
    seconds = time.perf_counter() - start
    return torchslim.load_model(out, registry=registry), report, seconds


def baseline(recipe: Any) -> nn.Module:
    """The recipe's model before any stage, built as ``torchslim.run`` builds it (same seed)."""
    torch.manual_seed(recipe.seed)
    return build_model(recipe.model, recipe.base_dir).eval()


def recipe_data(recipe: Any) -> dict[str, Any]:
    """The recipe's loaders, built as ``torchslim.run`` builds them (same seed)."""
    torch.manual_seed(recipe.seed)
    return dict(build_data(recipe.data))


def chain(recipe: Any) -> str:
    """``prune-70 + recover + int8``: the recipe's stage labels."""
    return " + ".join(stage.label for stage in recipe.stage_list)


def compressed_variants(recipes: Mapping[str, Any], settings: Settings) -> tuple[dict[str, nn.Module], list[str]]:
    """``{"float32": baseline, label: compressed model...}`` for recipes sharing one model and data,
    plus a note per recipe (its chain, time, and the engine's per-stage metric)."""
    first = next(iter(recipes.values()))
    models: dict[str, nn.Module] = {"float32": baseline(first)}
    notes = []
    for label, recipe in recipes.items():
        models[label], report, seconds = compress(recipe, settings)
        stages = ", ".join(f"{r.stage} {r.metrics[report.metric]:.4g}" for r in report.rows)
        notes.append(f"{label}: {chain(recipe)}; torchslim.run took {seconds:.0f}s; {report.metric} per stage: {stages}")
    return models, notes


def variant_rows(
    models: Mapping[str, nn.Module],
    forward: Callable[[nn.Module], Any],
    score: Callable[[nn.Module], float],
    settings: Settings,
    metric: str,
) -> list[dict[str, Any]]:
    """One row per model (the first is the baseline): size, latency, metric, and ratios to the baseline."""
    times = latencies(models, forward, settings)
    medians, fastest = median_ms(times), {name: min(values) * 1000.0 for name, values in times.items()}
    rows = []
    for name, model in models.items():
        rows.append(
            {
                "variant": name,
                "size_bytes": size_bytes(model),
                "latency_ms": medians[name],
                "latency_min_ms": fastest[name],
                metric: score(model),
            }
        )
    base = rows[0]
    for row in rows:
        row["size"] = kilobytes(row["size_bytes"])
        row["size_x"] = ratio(base["size_bytes"], row["size_bytes"])
        row["speed_x"] = ratio(base["latency_ms"], row["latency_ms"])
        row["speed_min_x"] = ratio(base["latency_min_ms"], row["latency_min_ms"])
        row[f"{metric}_change"] = row[metric] - base[metric]
    return rows


def environment(settings: Settings) -> dict[str, Any]:
    """Machine, versions and load, recorded with every result."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": settings.threads,
        "torch": torch.__version__,
        "torchslim": torchslim.__version__,
        "python": platform.python_version(),
        "mode": settings.mode,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def missing_modules(*names: str) -> list[str]:
    """The top-level modules among ``names`` that cannot be found (without importing them)."""
    import importlib.util

    return [name for name in names if importlib.util.find_spec(name) is None]
