"""The final model timed in turns with a reference model (``metrics.reference``): a latency that holds under load.

One timing of one model drifts with whatever else the machine runs: on a shared 2-core machine the same
deployed MiniLM read 18.7 ms and 23.3 ms minutes apart, and twice that with two busy processes beside it
(docs/search.md). Two models timed in turns, round by round, see the same load, so their ratio holds. A search
times every trial against one reference this way and reads each trial's latency as the reference's times the
ratio (:mod:`torchslim.search.reference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import RecipeError, TorchslimError
from .saving import MODEL_FILE, load_model
from .timing import speedup

if TYPE_CHECKING:
    from .recipe import MetricsOptions, RecipeBase


def reference_folder(recipe: RecipeBase) -> Path | None:
    """The folder ``metrics.reference`` names, a relative path taken from the recipe's directory (None: not set)."""
    given = recipe.metrics.reference
    if given is None:
        return None
    path = Path(given)
    return path if path.is_absolute() or recipe.base_dir is None else recipe.base_dir / path


def check_reference(recipe: RecipeBase) -> None:
    """RecipeError at ``metrics.reference`` when it does not name a folder holding a saved model."""
    folder = reference_folder(recipe)
    if folder is not None and not (folder / MODEL_FILE).is_file():
        raise RecipeError(
            f"{recipe.where(('metrics', 'reference'))}: metrics.reference: {folder} holds no saved model "
            f"({MODEL_FILE}); give the folder of a run saved with torchslim run --out (a relative path is taken "
            f"from the recipe's directory)"
        )


def time_against(folder: Path, final: nn.Module, batch: torch.Tensor, options: MetricsOptions) -> dict[str, Any]:
    """The reference in ``folder`` and ``final`` timed in turns on ``batch`` (``options``: the recipe's metrics): the
    medians, ``ratio`` = reference / final over the paired rounds (above 1: the final model is faster), its quartiles."""
    try:
        reference = load_model(folder)
    except TorchslimError as exc:
        raise RecipeError(f"metrics.reference: {folder}: {exc}") from None
    paired = speedup(reference, final.eval(), batch, warmup=options.warmup, runs=options.runs, threads=options.threads)
    timed = paired.to_dict()
    return {
        "path": str(folder),
        "ratio": timed["ratio"],
        "q1": timed["q1"],
        "q3": timed["q3"],
        "rounds": timed["rounds"],
        "reference_ms": timed["baseline_ms"],
        "final_ms": timed["final_ms"],
        "others_running": timed["others_running"],
    }


def reference_line(timed: dict[str, Any]) -> str:
    """The report's note on the final model against the reference."""
    return (
        f"against the reference {timed['path']}, timed in turns with it: final {timed['final_ms']:.4g} ms, "
        f"reference {timed['reference_ms']:.4g} ms, reference / final {timed['ratio']:.3f} (interquartile "
        f"{timed['q1']:.3f} to {timed['q3']:.3f} over {timed['rounds']} rounds)"
    )
