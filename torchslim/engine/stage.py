"""The stage protocol: what a compression stage is, and what it may read and write."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


class Stage(BaseModel, ABC):
    """A compression stage: its fields are its configuration, :meth:`apply` is its work.

    Subclasses narrow ``type`` to a literal tag, e.g. ``type: Literal["prune"] = "prune"``,
    and document each field with an attribute docstring (it becomes the schema's description).
    A config holds no runtime state; heavy imports belong inside :meth:`apply`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    type: str
    """The stage type, as registered."""
    name: str | None = None
    """Label of this stage in the summary table (defaults to the type)."""

    @property
    def label(self) -> str:
        """The name shown in reports."""
        return self.name or self.type

    @abstractmethod
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Compress ``model`` and return the model the engine continues with."""

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Redo this stage's structural changes (module swaps, removed channels) on a fresh model.

        Used to load a saved model: the architecture is rebuilt from the recipe, each stage's
        structure replayed, then the saved tensors loaded. ``record`` is what :meth:`apply` put
        in ``ctx.structure`` (e.g. which channels it kept). Stages that only change values keep
        this default, which changes nothing.
        """
        return model


@dataclass
class Context:
    """What a stage may use while it runs, and where it adds to the summary."""

    original: nn.Module
    """The model before the recipe's first stage (the default distillation teacher). Do not modify."""
    data: Mapping[str, Iterable[Batch]]
    """Loaders: ``train``, ``calibration``, ``eval``."""
    example_inputs: torch.Tensor
    """One batch of inputs, for tracing and measuring."""
    evaluate: Callable[[nn.Module], float]
    """The recipe's evaluate metric applied to the eval data."""
    metric_name: str = "accuracy"
    """The name of the evaluate metric in the summary."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    base_dir: Path | None = None
    """Directory of the recipe file: relative paths in stage options are resolved against it."""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("torchslim"))
    metrics: dict[str, Any] = field(default_factory=dict)
    """Stage-specific figures added to this stage's row (reset before each stage)."""
    notes: list[str] = field(default_factory=list)
    """Remarks printed under the summary table (e.g. why a stage cannot be faster)."""
    structure: dict[str, Any] = field(default_factory=dict)
    """What the current stage changed in the model's structure, as plain data (numbers, strings,
    lists, dicts), saved with the model and handed back to :meth:`Stage.restore` (reset before each stage)."""

    def add_metric(self, name: str, value: Any) -> None:
        """Add a figure to the current stage's row of the summary."""
        self.metrics[name] = value

    def note(self, text: str) -> None:
        """Add a remark to be printed under the summary table."""
        if text not in self.notes:
            self.notes.append(text)
