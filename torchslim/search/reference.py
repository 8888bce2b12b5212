"""A search's latency yardstick (``search.latency_reference``): every trial timed in turns with one reference.

A trial's latency is timed once, minutes after the trial before it, on a machine that may be busy meanwhile; read
alone, the figure ranks trials by the load they met as much as by their speed. So each trial's run ends by timing
its model in turns with a reference in the same runtime (``metrics.reference``, or the closing speed-up's baseline),
and the search reads the trial's latency as the reference's latency, measured once, divided by the paired ratio.

The reference: the baseline model put through the recipe's stages from its first ``deploy`` on, as the recipe
writes them (run once into ``OUT/reference``), so that it runs where the trials run; a recipe without a deploy stage
runs in torch, and its reference is the baseline itself, which every run already times in turns with its final model.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compare.jobs import Job, execute
from ..engine import names
from ..engine.atomic import write_text
from ..engine.errors import TorchslimError
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.report import Report, Row
from ..engine.yamlio import Document
from .plan import REFERENCE_DIR, REFERENCE_FILE, SearchPlan, reads_latency
from .space import SEARCH_KEYS

if TYPE_CHECKING:
    from .trial import Trials


class LatencyReferenceError(TorchslimError):
    """The reference run failed: the search cannot read its trials' latency against it."""


@dataclass(frozen=True)
class Reference:
    """The yardstick of a search's latency."""

    folder: Path | None
    """The saved reference model (None: the baseline, timed in turns by every run's closing speed-up)."""
    latency_ms: float
    """Its latency, timed once when the search began: each trial's latency is this over its paired ratio."""


def wanted(searched: SearchPlan) -> bool:
    """The search reads latency (an objective or a limit) and keeps ``latency_reference`` on."""
    return searched.spec.latency_reference and reads_latency(searched.recipe, searched.spec)


def prepare_reference(searched: SearchPlan, registry: Registry, log: logging.Logger, trials: Trials) -> Reference | None:
    """The search's reference: read back from ``OUT/reference.json`` (a resumed search), or made and timed now, on
    the threads ``trials`` gives each trial (``--jobs`` shares the cores), so that its latency is on their scale."""
    if not wanted(searched):
        return None
    kept = searched.out / REFERENCE_FILE
    if kept.is_file():
        data = json.loads(kept.read_text())
        return Reference(Path(data["folder"]) if data["folder"] else None, float(data["latency_ms"]))
    first = _first_deploy(searched.recipe)
    recipe = validate(trials.shared(_plain(searched, first or 0)), registry)
    if first is None:
        found = Reference(None, _latency(trials.baseline(recipe).metrics, "the baseline"))
    else:
        found = _run_reference(searched.out / REFERENCE_DIR, recipe, registry, log, trials.baseline(recipe))
    what = "the baseline" if found.folder is None else f"the baseline through stages {first}+ ({found.folder})"
    log.info("search: each trial's latency read against %s, %.4g ms when timed now", what, found.latency_ms)
    write_text(kept, json.dumps({"folder": str(found.folder) if found.folder else None, "latency_ms": found.latency_ms}))
    return found


def with_reference(document: Document, reference: Reference | None) -> Document:
    """A trial's recipe ``document`` with ``metrics.reference`` set to the reference's folder (if it has one)."""
    if reference is None or reference.folder is None:
        return document
    document.data.setdefault("metrics", {})["reference"] = str(reference.folder)
    return document


def paired_latency(final: dict[str, Any], report: Report, reference: Reference | None) -> dict[str, Any]:
    """``final`` with its latency read against ``reference`` (its own timing kept as ``latency_alone_ms``); as it
    is where there is no reference or no paired timing (the run changed nothing, latency off)."""
    if reference is None:
        return final
    timed = report.reference if reference.folder is not None else report.speedup
    ratio = (timed or {}).get("ratio")
    if not isinstance(ratio, (int, float)) or ratio <= 0 or final.get(names.LATENCY_MS) is None:
        return final
    return {**final, names.LATENCY_MS: reference.latency_ms / ratio, names.LATENCY_ALONE_MS: final[names.LATENCY_MS]}


def _first_deploy(recipe: RecipeBase) -> int | None:
    return next((i for i, stage in enumerate(recipe.stage_list) if stage.type == "deploy"), None)


def _plain(searched: SearchPlan, first: int) -> Document:
    """The search recipe without its search, from stage ``first`` on: the reference's recipe."""
    data = {k: copy.deepcopy(v) for k, v in searched.document.data.items() if k not in SEARCH_KEYS}
    data["stages"] = data["stages"][first:]
    data["name"] = f"{searched.recipe.name}-reference"
    return Document(data, searched.document.source)


def _run_reference(folder: Path, recipe: RecipeBase, registry: Registry, log: logging.Logger, baseline: Row) -> Reference:
    folder = folder.resolve()
    log.info("search: running the latency reference (the baseline through %s) into %s", recipe.stage_list[0].label, folder)
    assert recipe.document is not None  # validated from one
    outcome = execute(Job(recipe.name, recipe.document, registry, folder, baseline, None, False, recipe), log)
    if outcome.report is None:
        raise LatencyReferenceError(
            f"the latency reference (the recipe's stages from its first deploy on, applied to the baseline) failed: "
            f"{outcome.error}; set search.latency_reference: false to time each trial alone"
        )
    return Reference(folder, _latency(outcome.report.final.metrics, f"the reference in {folder}"))


def _latency(metrics: dict[str, Any], what: str) -> float:
    value = metrics.get(names.LATENCY_MS)
    if not isinstance(value, (int, float)) or value <= 0:
        raise LatencyReferenceError(f"{what}: latency not measured; set search.latency_reference: false")
    return float(value)
