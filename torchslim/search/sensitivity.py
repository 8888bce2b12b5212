"""How much each layer, or group of coupled layers, costs the model when compressed alone: ``torchslim
sensitivity``, and the search's per-layer bounds and first trial.

For every stage with the :class:`~torchslim.engine.hooks.PerUnit` hook (a low-bit quantize: one bit width per
layer; a structured prune: one amount per group of coupled channels, grouped as the pruner groups them), each
unit is compressed alone at a few settings and the model's outputs on the calibration data compared with those
of the model entering the stage: ``error``, the relative L2 distance of the outputs (mean over batches), and,
for class scores, ``disagreement``, the share of samples whose top class changes (in points). The stage as
written (every unit at its own setting) is measured the same way. The stages before a measured one run first,
as the recipe has them. A pass is cached in a file keyed by the model's tensors, the calibration inputs and the
settings, so a second pass on the same model costs a read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.atomic import write_text
from ..engine.errors import RecipeError, TorchslimError, UsageError, first_line
from ..engine.hooks import PerUnit
from ..engine.metrics import count_params
from ..engine.prepare import prepare
from ..engine.recipe import RecipeBase
from ..engine.runner import apply_stage
from ..engine.stage import Context, Stage
from ..engine.timing import torch_threads

#: Settings probed when none are given: bit widths of a low-bit quantize, amounts of a structured prune.
DEFAULT_SETTINGS = {"bits": (1.0, 2.0, 4.0, 8.0), "amount": (0.25, 0.5, 0.75)}
#: Calibration batches compared when none are given.
DEFAULT_BATCHES = 8
#: Bumped when what a cached pass holds or how it is measured changes: older files are not read.
CACHE_VERSION = 1
CACHE_PREFIX = "sensitivity-cache-"


@dataclass(frozen=True)
class Probe:
    """One unit compressed alone at one setting (or, with unit ``*``, the stage as written)."""

    unit: str
    setting: float
    error: float | None
    """Mean over the batches of ||out - out_float|| / ||out_float||; None when the probe failed."""
    disagreement: float | None = None
    """Points of samples whose top class differs from the float model's (outputs of class scores only)."""
    cost: float | None = None
    """What the unit then takes: bits of its weights (``bits``), parameters removed (``amount``)."""
    failed: str | None = None


@dataclass
class StageSensitivity:
    """The probes of one stage: units x settings, and the stage as written."""

    stage: int
    label: str
    unit_kind: str
    unit_setting: str
    unit_option: str
    units: list[str]
    settings: list[float]
    probes: list[Probe]
    uniform: Probe
    seconds: float
    cached: bool = False
    key: str = ""

    def probe(self, unit: str, setting: float) -> Probe | None:
        """The probe of ``unit`` at ``setting``, if measured."""
        return next((p for p in self.probes if p.unit == unit and p.setting == setting), None)

    def to_json(self) -> dict[str, Any]:
        """As plain data (the cache file and sensitivity.json)."""
        return {**asdict(self), "probes": [asdict(p) for p in self.probes], "uniform": asdict(self.uniform)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageSensitivity:
        """What :meth:`to_json` wrote."""
        return cls(**{**data, "probes": [Probe(**p) for p in data["probes"]], "uniform": Probe(**data["uniform"])})


@dataclass
class Sensitivity:
    """A recipe's sensitivity pass: one entry per measured stage, and what it cost."""

    recipe: str
    metric_note: str
    batches: int
    samples: int
    stages: list[StageSensitivity] = field(default_factory=list)
    seconds: float = 0.0


def measure(
    recipe: RecipeBase,
    out: Path,
    *,
    stages: Sequence[int] | None = None,
    settings: Sequence[float] | None = None,
    batches: int = DEFAULT_BATCHES,
    log: logging.Logger | None = None,
) -> Sensitivity:
    """The sensitivity of each ``PerUnit`` stage of ``recipe`` (or of the ``stages`` indexes), cached in ``out``."""
    log = log or logging.getLogger("torchslim")
    chosen = _chosen(recipe, stages)
    start = time.perf_counter()
    with torch_threads(recipe.work_threads()):
        ctx, model = prepare(recipe, log)
        inputs = _inputs(ctx, batches)
        result = Sensitivity(
            recipe.name, "output error on the calibration data", len(inputs), sum(int(x.shape[0]) for x in inputs)
        )
        for index, stage in enumerate(recipe.stages[: max(chosen) + 1]):
            if index in chosen:
                result.stages.append(_stage(index, stage, model, ctx, inputs, settings, out, log))
            if index < max(chosen):
                log.info("sensitivity: running stage %s (before a measured stage)", stage.label)
                model, _ = apply_stage(stage, model, ctx.for_stage())
    result.seconds = time.perf_counter() - start
    return result


def _chosen(recipe: RecipeBase, stages: Sequence[int] | None) -> list[int]:
    able = [i for i, s in enumerate(recipe.stages) if isinstance(s, PerUnit)]
    if stages is None:
        if not able:
            kinds = ", ".join(f"{s.label} ({s.type} {getattr(s, 'method', '')})".replace(" )", ")") for s in recipe.stages)
            raise RecipeError(
                f"{recipe.where(('stages',))}: stages: no stage can be measured per layer or group "
                f"(quantize binary/ternary/kbit/float8, prune structured); the recipe has: {kinds or 'none'}"
            )
        return able
    for i in stages:
        if i not in able:
            raise UsageError(
                f"--stage {i}: stage {i} is not one that can be measured per layer or group "
                f"(those are: {', '.join(map(str, able)) or 'none'})"
            )
    return sorted(stages)


def _stage(
    index: int,
    stage: Stage,
    model: nn.Module,
    ctx: Context,
    inputs: list[torch.Tensor],
    settings: Sequence[float] | None,
    out: Path,
    log: logging.Logger,
) -> StageSensitivity:
    assert isinstance(stage, PerUnit)
    tried = sorted(float(s) for s in (settings or DEFAULT_SETTINGS[stage.unit_setting]))
    key = cache_key(model, stage, inputs, tried)
    cached = _read_cache(out, key)
    if cached is not None:
        log.info("sensitivity: %s: read from %s%s.json", stage.label, CACHE_PREFIX, key)
        return cached
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        reference = [model(x).float() for x in inputs]
    units = stage.units(model, ctx.example_inputs)
    log.info("sensitivity: %s: %d %s(s) x %d settings", stage.label, len(units), stage.unit_kind, len(tried))
    probes = [
        _probe(stage.alone(u, s, units), model, ctx, inputs, reference, u, s, stage.unit_setting) for u in units for s in tried
    ]
    uniform = _probe(stage, model, ctx, inputs, reference, "*", stage.uniform_setting(), stage.unit_setting)
    if stage.unit_setting == "bits":  # the stage as written spends its bits on every unit
        uniform = Probe(
            uniform.unit,
            uniform.setting,
            uniform.error,
            uniform.disagreement,
            sum(p.cost or 0.0 for p in probes if p.setting == tried[0]) * stage.uniform_setting() / tried[0],
            uniform.failed,
        )
    found = StageSensitivity(
        index,
        stage.label,
        stage.unit_kind,
        stage.unit_setting,
        stage.unit_option,
        units,
        tried,
        probes,
        uniform,
        time.perf_counter() - start,
        key=key,
    )
    _write_cache(out, found)
    return found


def _probe(
    stage: Stage,
    model: nn.Module,
    ctx: Context,
    inputs: list[torch.Tensor],
    reference: list[torch.Tensor],
    unit: str,
    setting: float,
    kind: str,
) -> Probe:
    """``stage`` applied to a copy of ``model``, its outputs compared with ``reference``."""
    try:
        changed = stage.apply(copy.deepcopy(model), ctx.for_stage()).eval()
        with torch.no_grad():
            outputs = [changed(x).float() for x in inputs]
    except (TorchslimError, RuntimeError, ValueError) as exc:  # a unit this setting cannot compress
        return Probe(unit, setting, None, failed=first_line(exc, typed=True, limit=200))
    errors = [float((o - r).norm() / r.norm().clamp(min=1e-12)) for o, r in zip(outputs, reference, strict=True)]
    disagreement = None
    if reference[0].dim() == 2 and reference[0].shape[1] > 1:
        differ = sum(int((o.argmax(1) != r.argmax(1)).sum()) for o, r in zip(outputs, reference, strict=True))
        disagreement = 100.0 * differ / sum(int(r.shape[0]) for r in reference)
    return Probe(unit, setting, sum(errors) / len(errors), disagreement, _cost(model, changed, unit, setting, kind))


def _cost(model: nn.Module, changed: nn.Module, unit: str, setting: float, kind: str) -> float:
    if kind == "amount":
        return float(count_params(model) - count_params(changed))
    if unit == "*":
        return 0.0  # set by the caller from the units' weights
    weight = getattr(model.get_submodule(unit), "weight", None)
    return float(weight.numel() * setting) if isinstance(weight, torch.Tensor) else 0.0


def _inputs(ctx: Context, batches: int) -> list[torch.Tensor]:
    found = []
    for batch in ctx.data["calibration"]:
        found.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if len(found) >= batches:
            break
    if not found or not all(isinstance(x, torch.Tensor) for x in found):
        raise RecipeError(
            "data.target: the calibration loader must yield (inputs, targets) tensor batches for a sensitivity pass"
        )
    return found


def cache_key(model: nn.Module, stage: Stage, inputs: Sequence[torch.Tensor], settings: Sequence[float]) -> str:
    """A hash of the model's tensors, the stage's options, the calibration inputs and the settings."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(_bytes(tensor))
    for x in inputs:
        digest.update(_bytes(x))
    settings_text = json.dumps([CACHE_VERSION, stage.model_dump(mode="json"), list(settings)], sort_keys=True)
    digest.update(settings_text.encode())
    return digest.hexdigest()[:16]


def _bytes(tensor: Any) -> bytes:
    """The raw bytes of a tensor (of any dtype and shape, a 0-d one too; a quantized one's integers)."""
    if not isinstance(tensor, torch.Tensor):  # torch.ao's packed parameters and other extra state
        return repr(tensor).encode()
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _read_cache(out: Path, key: str) -> StageSensitivity | None:
    path = out / f"{CACHE_PREFIX}{key}.json"
    if not path.is_file():
        return None
    try:
        found = StageSensitivity.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):  # a damaged or older file: measured again
        return None
    found.cached = True
    return found


def _write_cache(out: Path, found: StageSensitivity) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{CACHE_PREFIX}{found.key}.json", json.dumps(found.to_json(), indent=1) + "\n")
