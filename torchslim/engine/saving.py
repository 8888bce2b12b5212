"""Saving and loading compressed models without pickling code.

A saved model is the resolved recipe (``recipe.yaml``) plus a state dict (``model.pt``).
Loading rebuilds the architecture from the recipe, replays each completed stage's structural
changes (:meth:`Stage.restore`), then loads the tensors with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .atomic import write_text, write_with
from .errors import CheckpointError
from .hooks import Deployed
from .packed import smallest_state, unpack_state_dict
from .recipe import RecipeBase, load_recipe
from .registry import Registry
from .specs import build_model, load_state, loading_weights, safe_load
from .usercode import importable
from .yamlio import dump_yaml

FORMAT = "torchslim.model/1"
MODEL_FILE = "model.pt"
RECIPE_FILE = "recipe.yaml"
#: The files a model deployed to a runtime writes beside model.pt (runtime models only), and their description.
DEPLOY_FILES = ("model.onnx", "model.xml", "model.bin")
DEPLOY_INFO = "deploy.json"


def save_model(out_dir: Path, recipe: RecipeBase, model: nn.Module, structure: list[dict[str, Any]]) -> None:
    """Write ``recipe.yaml`` and ``model.pt`` atomically.

    ``structure`` holds one record per completed stage (what it recorded with ``ctx.record_for_restore``).
    """
    # The packed form (non-zero values + bitmask) is used where it is smaller than dense.
    payload = {
        "format": FORMAT,
        "structure": structure,
        "state_dict": smallest_state(model.state_dict()),
        # load_model imports the recipe's targets from here too, as the run did (a mynet.py beside it)
        "recipe_dir": str(recipe.base_dir) if recipe.base_dir is not None else None,
    }

    def write(handle: IO[bytes]) -> None:
        torch.save(payload, handle)

    write_with(out_dir / MODEL_FILE, write)
    write_text(out_dir / RECIPE_FILE, dump_yaml(recipe.resolved()))
    write_deploy_files(out_dir, model, {"metric": recipe.evaluate.metric})


def write_deploy_files(out_dir: Path, model: nn.Module, info: Mapping[str, Any]) -> tuple[str, ...]:
    """For a model deployed to a runtime (a ``deploy_files()`` method): its files (model.onnx, or
    model.xml + model.bin) and deploy.json (its ``deploy_info()`` and ``info``) beside model.pt; the
    names written. deploy.json is removed first and written last, so it is present only beside complete
    files. Deployable files of another model (an earlier run's or export's) are removed, so the folder
    never holds one that deploy.json does not describe."""
    deployed = model if isinstance(model, Deployed) else None
    files = deployed.deploy_files() if deployed is not None else {}
    (out_dir / DEPLOY_INFO).unlink(missing_ok=True)
    for name, data in files.items():
        write_with(out_dir / name, lambda handle, data=data: handle.write(data))  # type: ignore[misc]
    for name in DEPLOY_FILES:
        if name not in files:
            (out_dir / name).unlink(missing_ok=True)
    if deployed is None or not files:
        return ()
    write_text(out_dir / DEPLOY_INFO, json.dumps({**deployed.deploy_info(), **info}, indent=2) + "\n")
    return (*files, DEPLOY_INFO)


def load_model(path: str | os.PathLike[str], registry: Registry | None = None) -> nn.Module:
    """Load a model saved by ``torchslim run --out DIR``: ``torchslim.load_model(DIR)``.

    Imports the model's code named in the recipe (as running the recipe would, the directory of the
    recipe that ran included, if it still exists), never code from the checkpoint. The model factory
    is called with :func:`torchslim.weights_will_load` True (it may skip training). Returns the model
    in eval mode.
    """
    with opened_run(path, registry) as run:
        return run.model


@dataclass(frozen=True)
class SavedRun:
    """A saved run read back: its recipe, the model file's payload and the rebuilt model (eval mode)."""

    recipe: RecipeBase
    payload: dict[str, Any]
    model: nn.Module


@contextmanager
def opened_run(path: str | os.PathLike[str], registry: Registry | None = None) -> Iterator[SavedRun]:
    """The run saved in ``path``, rebuilt as :func:`load_model` does; inside the block the recipe's own
    modules stay importable (its data factory, say, can be called as it was in the run)."""
    folder = Path(path)
    recipe = load_recipe(folder / RECIPE_FILE, registry)
    payload = read_payload(folder / MODEL_FILE)
    with importable(recipe_dir(payload)):
        yield SavedRun(recipe, payload, rebuild(recipe, payload, folder / MODEL_FILE).eval())


def recipe_dir(payload: dict[str, Any]) -> Path | None:
    """The folder of the recipe a saved model came from (importable when it is rebuilt), if it still exists."""
    directory = payload.get("recipe_dir")
    return Path(directory) if isinstance(directory, str) and Path(directory).is_dir() else None


def read_payload(path: Path) -> dict[str, Any]:
    """Read a torchslim model file safely and check its format."""
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a torchslim model file (expected format {FORMAT})")
    if not isinstance(payload.get("structure"), list):
        raise CheckpointError(f"{path}: the model file has no stage structure list")
    return payload


def rebuild(recipe: RecipeBase, payload: dict[str, Any], path: Path, model: nn.Module | None = None) -> nn.Module:
    """The recipe's model (or a copy of it given as ``model``) with the saved stages' structure
    replayed and the saved tensors loaded."""
    if model is None:
        # The saved state replaces every weight, so the original checkpoint is not needed (nor read),
        # and a factory that trains may skip it (weights_will_load()).
        with loading_weights():
            model = build_model(recipe.model.model_copy(update={"checkpoint": None}), None)
    # A checkpoint taken after k stages holds k records: replay only those stages.
    for stage, record in zip(recipe.stage_list, payload["structure"], strict=False):
        model = stage.restore(model.eval(), record)
    load_state(model, unpack_state_dict(payload["state_dict"]), str(path))
    return model
