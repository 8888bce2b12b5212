"""Built-in ``prune`` stage: magnitude pruning, made permanent."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..engine.errors import StageError
from ..engine.stage import Context, Stage
from ._layers import layer_census, layer_type, select_layers


class PruneStage(Stage):
    """Zero the smallest-magnitude weights of the chosen layers.

    Unstructured zeros do not make a dense model faster or its file smaller on their own;
    the summary says so. Later stages (quantize) and sparse storage turn them into gains.
    """

    type: Literal["prune"] = "prune"
    method: Literal["magnitude"] = "magnitude"
    """``magnitude``: unstructured L1 magnitude pruning of individual weights."""
    amount: float = Field(gt=0, lt=1)
    """Fraction of the chosen weights set to zero, between 0 and 1 (exclusive)."""
    scope: Literal["global", "layer"] = "global"
    """``global`` ranks all chosen weights together; ``layer`` prunes ``amount`` of each layer."""
    modules: list[str] = Field(default_factory=lambda: ["Linear", "Conv2d"], min_length=1)
    """Layer types (torch.nn class names) whose weights are pruned."""
    exclude: list[str] = Field(default_factory=list)
    """Layer name patterns (fnmatch, e.g. ``classifier`` or ``blocks.*.conv1``) left untouched."""

    @field_validator("modules")
    @classmethod
    def _known_layers(cls, value: list[str]) -> list[str]:
        for name in value:
            layer_type(name)
        return value

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Prune in place and remove the masks, so only plain zero weights remain."""
        from torch.nn.utils import prune

        layers = select_layers(model, self.modules, self.exclude)
        targets = [(m, "weight") for _, m in layers if isinstance(getattr(m, "weight", None), torch.Tensor)]
        if not targets:
            raise StageError(self.label, f"modules {self.modules} (minus exclude {self.exclude}) matched no layer "
                             f"with a weight; the model has: {layer_census(model)}")
        if self.scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=self.amount)
        else:
            for module, name in targets:
                prune.l1_unstructured(module, name, amount=self.amount)
        for module, name in targets:
            prune.remove(module, name)  # fold weight_orig * weight_mask back into a plain weight
        self._report(targets, ctx)
        return model

    def _report(self, targets: list[tuple[nn.Module, str]], ctx: Context) -> None:
        tensors = [getattr(m, name) for m, name in targets]
        total = sum(t.numel() for t in tensors)
        zeros = sum(int((t == 0).sum()) for t in tensors)
        ctx.add_metric("pruned_layers", len(targets))
        ctx.add_metric("pruned_sparsity", zeros / total)
        ctx.note("unstructured pruning leaves dense tensors: the zeros alone do not lower latency or the "
                 "dense file size on a CPU; a later quantize stage or sparse storage turns them into savings")
