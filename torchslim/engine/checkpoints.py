"""Per-stage checkpoints under ``--out DIR``, and resuming from them.

After stage k the runner writes ``DIR/checkpoints/stage-0k/`` with the model (the same format
as the final model) and ``progress.json`` (the summary rows so far). Each checkpoint is keyed
by the hash of the resolved recipe up to and including that stage, so ``--resume`` reuses
exactly the stages whose recipe prefix is unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import write_text
from .errors import TorchslimError
from .recipe import RecipeBase
from .report import Report, Row
from .saving import MODEL_FILE, read_payload, rebuild, save_model
from .stage import Context

CHECKPOINT_DIR = "checkpoints"
PROGRESS_FILE = "progress.json"


def recipe_hash(recipe: RecipeBase, stages: int | None = None) -> str:
    """SHA-256 of the resolved recipe with its first ``stages`` stages (all by default).

    The recipe's ``name`` is left out: renaming a recipe should not throw away hours of work.
    """
    data = recipe.resolved()
    data.pop("name", None)
    data["stages"] = data["stages"][: len(data["stages"]) if stages is None else stages]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def checkpoint_dir(out_dir: Path, index: int) -> Path:
    """Folder of the checkpoint taken after stage ``index`` (0-based)."""
    return out_dir / CHECKPOINT_DIR / f"stage-{index + 1:02d}"


def save_checkpoint(
    out_dir: Path, index: int, recipe: RecipeBase, model: nn.Module, structure: list[dict[str, Any]], report: Report
) -> None:
    """Write the checkpoint after stage ``index``; progress.json last, so it marks a complete one."""
    folder = checkpoint_dir(out_dir, index)
    save_model(folder, recipe, model, structure)
    progress = {
        "key": recipe_hash(recipe, index + 1),
        "rows": [row.to_dict() for row in report.rows],
        "notes": list(report.notes),
    }
    write_text(folder / PROGRESS_FILE, json.dumps(progress, indent=2) + "\n")


@dataclass
class Resumed:
    """What a checkpoint gives back: the stages done, the model after them, and the rows so far."""

    stages_done: int
    model: nn.Module
    structure: list[dict[str, Any]]
    rows: list[Row]
    notes: list[str]


def find_resumable(out_dir: Path, recipe: RecipeBase, original: nn.Module) -> Resumed | None:
    """The latest checkpoint whose recipe prefix matches ``recipe``, or None.

    ``original`` is the freshly built model; a copy of it receives the checkpoint's structure and tensors.
    """
    for index in reversed(range(len(recipe.stage_list))):
        progress = _read_progress(checkpoint_dir(out_dir, index))
        if progress is not None and progress.get("key") == recipe_hash(recipe, index + 1):
            return _load(out_dir, index, recipe, progress, copy.deepcopy(original))
    return None


def checkpointed_stages(out_dir: Path) -> int:
    """How many stage checkpoints in ``out_dir`` are complete (their progress.json written)."""
    folders = sorted((out_dir / CHECKPOINT_DIR).glob("stage-*"))
    return sum(_read_progress(folder) is not None for folder in folders)


def _read_progress(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _load(out_dir: Path, index: int, recipe: RecipeBase, progress: dict[str, Any], fresh: nn.Module) -> Resumed:
    path = checkpoint_dir(out_dir, index) / MODEL_FILE
    payload = read_payload(path)
    model = rebuild(recipe, payload, path, fresh)
    rows = [Row.from_dict(r) for r in progress["rows"]]
    return Resumed(index + 1, model, list(payload["structure"]), rows, list(progress.get("notes", [])))


def resume(out_dir: Path, recipe: RecipeBase, ctx: Context, report: Report) -> tuple[nn.Module, list[dict[str, Any]]] | None:
    """Continue from the latest matching checkpoint: its rows and notes go into ``report``; returns
    the model after the completed stages and their restore records, or None (nothing to reuse)."""
    resumed = find_resumable(out_dir, recipe, ctx.original)
    if resumed is None:
        ctx.log.info("resume: no checkpoint in %s matches this recipe; running every stage", out_dir)
        return None
    labels = ", ".join(row.stage for row in resumed.rows[1:])
    ctx.log.info("resume: reusing %d completed stage(s) (%s) from %s", resumed.stages_done, labels, out_dir / CHECKPOINT_DIR)
    report.rows.extend(resumed.rows)
    report.add_notes(resumed.notes)
    return resumed.model, resumed.structure


@dataclass(frozen=True)
class ReloadProblem:
    """Why a checkpoint does not give back the model the stage returned."""

    text: str
    """What went wrong, one line."""
    unreadable: bool = False
    """True when the saved file could not be read back at all (its state dict holds something
    ``torch.load(..., weights_only=True)`` refuses); False when it was read but rebuilt differently."""
    cause: BaseException | None = None
    """The exception behind it, if any (the failure log shows its traceback)."""


def reload_problem(out_dir: Path, index: int, recipe: RecipeBase, model: nn.Module, ctx: Context) -> ReloadProblem | None:
    """Rebuild the checkpoint just written after stage ``index`` as :func:`torchslim.load_model` would
    (fresh model, each stage's ``restore``, saved tensors) and compare its outputs with ``model``'s
    on the example inputs; returns what is wrong, or None."""
    path = checkpoint_dir(out_dir, index) / MODEL_FILE
    try:
        payload = read_payload(path)
    except TorchslimError as exc:
        return ReloadProblem(str(exc), unreadable=True, cause=exc)
    try:
        rebuilt = rebuild(recipe, payload, path, copy.deepcopy(ctx.original)).eval()
    except TorchslimError as exc:
        return ReloadProblem(str(exc), cause=exc)
    except Exception as exc:  # a plugin's restore can fail in any way
        return ReloadProblem(f"{type(exc).__name__}: {exc}", cause=exc)
    with torch.inference_mode():
        expected, got = _tensors(model.eval()(ctx.example_inputs)), _tensors(rebuilt(ctx.example_inputs))
    difference = _difference(expected, got)
    return None if difference is None else ReloadProblem(difference)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output.detach().float().cpu()]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else []
    return [t for value in values for t in _tensors(value)]


def _difference(expected: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    if [t.shape for t in expected] != [t.shape for t in got]:
        return f"its outputs have shapes {[tuple(t.shape) for t in got]}, not {[tuple(t.shape) for t in expected]}"
    for want, have in zip(expected, got, strict=True):
        scale = float(want.abs().max()) if want.numel() else 0.0
        if not torch.allclose(want, have, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
            largest = float((want - have).abs().max())
            return f"its outputs differ from the model the stage returned (largest difference {largest:.3g})"
    return None
