"""Float32 baselines inside each runtime: the original model deployed as a variant deploys it, nothing else.

A variant with a ``deploy`` stage is measured in ONNX Runtime or OpenVINO, so its ratios to the
torch baseline mix two gains: the runtime's own and the compression's. The runtime baseline
separates them: the unmodified model through the same deploy stage (runtime, opset, exporter,
dynamic axes), measured with the variant's metrics options (threads, batch, runs), once per
comparison for every variant that shares the torch baseline and the deploy options. It runs
through the engine like a one-stage recipe, so with ``--out`` it has a report directory of its
own (``baseline@onnxruntime/``) and is reused on a repeat under the same conditions as a variant.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import names
from ..engine.errors import RecipeError, TorchslimError
from ..engine.hooks import RuntimeStage
from ..engine.noise import latency_noise
from ..engine.recipe import RecipeBase, validate
from ..engine.registry import Registry
from ..engine.report import Report, Row
from ..engine.runner import run
from ..engine.yamlio import Document
from .finished import finished_report
from .sweep import Variant

#: Report directories of runtime baselines start with it; no variant's folder can (``@`` becomes ``_`` there).
FOLDER_PREFIX = "baseline@"
NOT_MEASURED = "not measured"


@dataclass
class RuntimeBaseline:
    """The original model deployed to one runtime in float32, shared by the variants deploying there."""

    label: str
    """``baseline @onnxruntime`` (with the first variant's name when two would read the same)."""
    runtime: str
    folder: str
    """Its report directory under ``--out``."""
    group: int
    """Index of the torch baseline it is measured beside (its ratios in the table are to that one)."""
    options: dict[str, Any]
    """The deploy stage's options (without its name), as the variants give them."""
    variants: list[str] = field(default_factory=list)
    recipe: RecipeBase | None = field(default=None, repr=False)
    """The one-stage recipe it is measured with (None when it did not validate: see ``error``)."""
    row: Row | None = None
    """Its figures (None until measured, or when it could not be)."""
    error: str | None = None
    """Why it was not measured."""
    reused: bool = False
    environment: dict[str, Any] = field(default_factory=dict)
    speedup: dict[str, Any] | None = None
    """torch float32 / runtime float32 latency, timed interleaved by its run."""

    @property
    def status(self) -> str:
        """``measured``, ``reused`` or ``failed``."""
        return "failed" if self.row is None else ("reused" if self.reused else "measured")

    def noisy(self) -> bool:
        """Whether its latency is noise, by the rules of a run's report."""
        return self.row is not None and bool(latency_noise(self.row.metrics, self.environment))

    def describe(self) -> str:
        """Its line under the table: what it is, and whether it was measured, reused or not measured."""
        if self.row is None:
            variants = ", ".join(self.variants)
            return f"{self.label}: {NOT_MEASURED} ({self.error}); the ratios of {variants} to it read '{NOT_MEASURED}'"
        settings = f"opset {self.options.get('opset')}, {self.options.get('exporter')} exporter"
        what = (
            f"{self.label}: the original model in float32 in {self.row.metrics.get(names.RUNTIME)}, through the deploy "
            f"stage of {', '.join(self.variants)} ({settings}) and nothing else"
        )
        if self.reused:
            return f"{what}; taken from {self.folder}/ (same recipe hash, environment and runtime version), not measured again"
        return f"{what}; measured once, for {len(self.variants)} variant(s), with their metrics settings"


def plan_runtimes(
    planned: Sequence[tuple[Variant, RecipeBase]], groups: Sequence[int], registry: Registry
) -> tuple[list[RuntimeBaseline], list[int | None]]:
    """The runtime baselines the variants need, and for each variant the index of its own (None: torch only)."""
    found: dict[str, RuntimeBaseline] = {}
    indices: list[int | None] = []
    for (variant, recipe), group in zip(planned, groups, strict=True):
        position = deploy_position(recipe)
        if position is None:
            indices.append(None)
            continue
        options = recipe.stage_list[position].model_dump(mode="json", exclude={"name"})
        key = json.dumps([group, options], sort_keys=True)
        if key not in found:
            found[key] = RuntimeBaseline("", str(options["runtime"]), "", group, options)
            _prepare(found[key], variant.document, position, registry)
        found[key].variants.append(variant.name)
        indices.append(list(found).index(key))
    baselines = list(found.values())
    _name(baselines)
    return baselines, indices


def deploy_position(recipe: RecipeBase) -> int | None:
    """Index of the recipe's stage that moves the model into a runtime (a :class:`RuntimeStage`: ``deploy``, or
    a plugin's), or None when its model stays in torch."""
    return next((i for i, stage in enumerate(recipe.stage_list) if isinstance(stage, RuntimeStage)), None)


def _prepare(baseline: RuntimeBaseline, document: Document, position: int, registry: Registry) -> None:
    """The variant's recipe with its deploy stage alone: same model, data, metrics, seed and export."""
    data = copy.deepcopy(document.data)
    data["stages"] = [{k: v for k, v in data["stages"][position].items() if k != "name"}]
    data["name"] = f"{FOLDER_PREFIX}{baseline.runtime}"
    try:
        baseline.recipe = validate(Document(data, document.source), registry)
    except RecipeError as exc:  # valid inside the variant, so not expected; the variants still run
        baseline.error = str(exc)


def _name(baselines: list[RuntimeBaseline]) -> None:
    """Labels and folders: ``baseline @onnxruntime``, made distinct by the first variant's name when needed."""
    for baseline in baselines:
        same = [b for b in baselines if b.runtime == baseline.runtime]
        baseline.label = f"baseline @{baseline.runtime}" + (f" ({baseline.variants[0]})" if len(same) > 1 else "")
        suffix = f"-{same.index(baseline) + 1}" if len(same) > 1 else ""
        baseline.folder = f"{FOLDER_PREFIX}{baseline.runtime}{suffix}"


def measure_all(
    baselines: list[RuntimeBaseline], torch_rows: list[Row], out_dir: Path | None, registry: Registry, log: logging.Logger
) -> int:
    """Measure (or reuse) each runtime baseline once; return how many were measured here.

    ``torch_rows`` are the torch baselines, given to each run so the torch model is not measured again.
    """
    measured = 0
    for baseline in baselines:
        if baseline.recipe is None:
            continue
        folder = out_dir / baseline.folder if out_dir is not None else None
        report = finished_report(folder, baseline.recipe, log) if folder is not None else None
        stage = baseline.recipe.stage_list[0]  # the runtime stage the baseline recipe was made of
        if report is not None and isinstance(stage, RuntimeStage) and _same_runtime(report, stage, log):
            baseline.reused = True
        else:
            report = _run(baseline, baseline.recipe, torch_rows[baseline.group], folder, registry, log)
            measured += report is not None
        if report is not None:
            baseline.row = Row(baseline.label, baseline.recipe.stage_list[0].type, dict(report.final.metrics))
            baseline.environment, baseline.speedup = dict(report.environment), report.speedup
    return measured


def _run(
    baseline: RuntimeBaseline, recipe: RecipeBase, torch_row: Row, folder: Path | None, registry: Registry, log: logging.Logger
) -> Report | None:
    log.info("compare: measuring %s once, for %d variant(s)", baseline.label, len(baseline.variants))
    try:
        return run(recipe, folder, registry=registry, overwrite=True, log=log, baseline=torch_row)
    except TorchslimError as exc:  # a missing extra, a failed export: the variants still show
        log.warning("compare: %s %s: %s", baseline.label, NOT_MEASURED, exc)
        baseline.error = str(exc)
        return None


def _same_runtime(report: Report, stage: RuntimeStage, log: logging.Logger) -> bool:
    """Whether a finished report was measured in the runtime version installed now (its upgrade changes latency)."""
    then, now = report.final.metrics.get(names.RUNTIME), stage.installed_runtime()
    if then != now:
        log.info("compare: the float32 baseline in %s was measured in %s, now %s: measuring it again", stage.runtime, then, now)
    return then == now


def version_lines(baselines: list[RuntimeBaseline], finals: dict[str, dict[str, Any]]) -> list[str]:
    """A warning for each variant measured in another version of its runtime than its baseline (a reused report)."""
    lines = []
    for baseline in baselines:
        then = baseline.row.metrics.get(names.RUNTIME) if baseline.row is not None else None
        for name in baseline.variants:
            got = finals.get(name, {}).get(names.RUNTIME)
            if then and got and got != then:
                lines.append(f"{name} was measured in {got}, {baseline.label} in {then}: its ratio to it compares two versions")
    return lines
