"""Methods that zero weights in place (magnitude, wanda, nm): the model keeps its shapes."""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated, ClassVar

from pydantic import AfterValidator, Field
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from .._layers import check_patterns, has_weight, layer_census, layer_type, select_layers, weight_of
from .base import PruneStage


def _known_types(names: list[str]) -> list[str]:
    for name in names:
        layer_type(name)  # ValueError, hence a validation error, for a name that is no torch.nn layer
    return names


LayerTypes = Annotated[list[str], Field(min_length=1), AfterValidator(_known_types)]
"""Names of torch.nn layer classes, e.g. ``[Linear, Conv2d]``."""

Layers = dict[str, nn.Module]
"""Layers to prune by name (as in ``model.named_modules()``)."""


class ZeroingPrune(PruneStage):
    """A pruning method that zeroes weights of the chosen layers, ``steps`` times, fine-tuning in between."""

    cpu_note: ClassVar[str]
    """Said under the summary: what these zeros do not buy on a CPU."""

    modules: LayerTypes
    """Layer types (torch.nn class names) whose weights are pruned."""

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Zero weights of the chosen layers in place and return the model."""
        layers, skipped = self._chosen(model)
        for step in range(1, self.steps + 1):
            self._step(model, layers, step, ctx)
            self._finetune(model, ctx, step)
        self._report(layers, skipped, ctx)
        return model

    @abstractmethod
    def _step(self, model: nn.Module, layers: Layers, step: int, ctx: Context) -> None:
        """Zero what step ``step`` of ``steps`` adds: the method's full pattern after the last."""

    def _chosen(self, model: nn.Module) -> tuple[Layers, list[str]]:
        """The layers to prune, and the names of chosen layers left alone (none here)."""
        check_patterns(model, self.exclude, "exclude", self.label)
        chosen = {name: layer for name, layer in select_layers(model, self.modules, self.exclude) if has_weight(layer)}
        if not chosen:
            raise StageError(
                self.label,
                f"modules {self.modules} (minus exclude {self.exclude}) matched no layer "
                f"with a weight; the model has: {layer_census(model)}",
            )
        return chosen, []

    def _report(self, layers: Layers, skipped: list[str], ctx: Context) -> None:
        tensors = [weight_of(layer) for layer in layers.values()]
        zeros = sum(int((t == 0).sum()) for t in tensors)
        ctx.add_metric("pruned_layers", len(layers))
        ctx.add_metric("pruned_sparsity", zeros / sum(t.numel() for t in tensors))
        if skipped:
            ctx.add_metric("skipped_layers", len(skipped))
            ctx.log.info("  %s: left dense (input dimension not a multiple of m): %s", self.label, ", ".join(skipped))
        ctx.note(self.cpu_note)
