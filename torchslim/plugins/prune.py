"""Built-in ``prune`` stage: unstructured (magnitude, activation-aware ``wanda``), structured (whole
channels removed) and N:M pruning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, SerializerFunctionWrapHandler, ValidationInfo, field_validator, model_serializer
from pydantic_core import PydanticCustomError
from torch import nn

from ..engine.errors import StageError
from ..engine.stage import Context, Stage
from ._layers import has_weight, layer_census, layer_type, select_layers, weight_of
from ._nm import fits, nm_mask
from ._shapes import changes, replay, snapshot
from ._unstructured import capped_magnitude, torch_magnitude

Method = Literal["magnitude", "wanda", "structured", "nm"]

#: The methods each method-specific option applies to; given for another method it is an error.
APPLIES: dict[str, tuple[str, ...]] = {
    "amount": ("magnitude", "wanda", "structured"),
    "scope": ("magnitude", "structured"),
    "modules": ("magnitude", "wanda", "nm"),
    "calibration_batches": ("wanda",),
    "importance": ("structured",),
    "round_to": ("structured",),
    "max_layer_amount": ("magnitude", "structured"),
    "n": ("nm",),
    "m": ("nm",),
}

#: Defaults filled in when an option applies and is not given (``max_layer_amount`` has none for magnitude).
DEFAULTS: dict[tuple[str, str], Any] = {
    ("scope", "magnitude"): "global", ("scope", "structured"): "global",
    ("modules", "magnitude"): ["Linear", "Conv2d"], ("modules", "nm"): ["Linear", "Conv2d"],
    ("modules", "wanda"): ["Linear"], ("calibration_batches", "wanda"): 8,
    ("importance", "structured"): "l1", ("round_to", "structured"): 1,
    ("max_layer_amount", "structured"): 0.9, ("n", "nm"): 2, ("m", "nm"): 4,
}

_UNSTRUCTURED = ("unstructured pruning leaves dense tensors: the zeros alone do not lower latency or the "
                 "dense file size on a CPU; a later quantize stage or sparse storage turns them into savings")
CPU_NOTES = {
    "magnitude": _UNSTRUCTURED,
    "wanda": _UNSTRUCTURED,
    "nm": "N:M sparsity is accelerated only by sparse tensor cores (NVIDIA Ampere and later); on a CPU the "
          "zeros do not lower latency, and only a packed encoding of the weights makes the file smaller",
}


class PruneStage(Stage):
    """Prune the model: zero single weights (``magnitude``), zero weights in an N:M pattern (``nm``),
    or remove whole channels and neurons so that the model is really smaller and faster (``structured``).

    Options that belong to another method are refused. Unstructured and N:M zeros do not make a
    dense model faster on a CPU; the summary says so.
    """

    type: Literal["prune"] = "prune"
    method: Method = "magnitude"
    """``magnitude``: unstructured L1 pruning of single weights; ``wanda``: unstructured, each
    Linear weight scored by its magnitude times the norm of its input feature on the calibration
    data, the lowest ``amount`` of every output row zeroed; ``structured``: remove whole output
    channels / neurons (with the layers coupled to them); ``nm``: at most ``n`` non-zeros in every
    ``m`` consecutive weights along the input dimension."""
    amount: float | None = Field(default=None, gt=0, lt=1, validate_default=True)
    """Fraction of the chosen weights (magnitude; wanda: of each output row) or of the prunable channels (structured) removed,
    between 0 and 1 (exclusive). Required for those methods; nm's sparsity is ``1 - n/m`` instead."""
    scope: Literal["global", "layer"] | None = Field(default=None, validate_default=True)
    """``global`` ranks all candidates together; ``layer`` prunes ``amount`` of each layer (default
    ``global``; magnitude and structured)."""
    modules: list[str] | None = Field(default=None, min_length=1, validate_default=True)
    """Layer types (torch.nn class names) whose weights are pruned (default ``[Linear, Conv2d]``;
    magnitude and nm; wanda: ``[Linear]``, the only type it takes; structured follows the dependency
    graph instead)."""
    exclude: list[str] = Field(default_factory=list)
    """Layer name patterns (fnmatch, e.g. ``classifier`` or ``blocks.*.conv1``) left untouched; for
    structured, the channels coupled to an excluded layer stay too."""
    importance: Literal["l1", "l2"] | None = Field(default=None, validate_default=True)
    """Channel importance for structured: the L1 or L2 norm of its weights, averaged over the
    coupled layers (default ``l1``)."""
    round_to: int | None = Field(default=None, ge=1, validate_default=True)
    """Structured: leave channel counts that are multiples of this (e.g. 8), for kernel-friendly
    shapes (default 1: no rounding)."""
    max_layer_amount: float | None = Field(default=None, gt=0, lt=1, validate_default=True)
    """Most any one layer may lose, as a fraction of its channels (structured, default 0.9) or
    weights (magnitude, default none), so that global ranking cannot wipe out a small layer."""
    calibration_batches: int | None = Field(default=None, ge=1, validate_default=True)
    """wanda: batches of the calibration data the input norms are measured on (default 8)."""
    n: int | None = Field(default=None, ge=1, validate_default=True)
    """nm: non-zeros kept in each group of ``m`` (default 2)."""
    m: int | None = Field(default=None, ge=2, validate_default=True)
    """nm: group size along the input dimension (default 4)."""
    steps: int = Field(default=1, ge=1)
    """Prune in this many increments (gradual pruning), up to the full ``amount`` (or N:M pattern)."""
    finetune_epochs: int | None = Field(default=None, ge=1)
    """Epochs of cross-entropy fine-tuning on the train data between steps (needs ``steps`` >= 2)."""
    finetune_lr: float | None = Field(default=None, gt=0, validate_default=True)
    """Adam learning rate of the fine-tuning between steps (default 0.001)."""

    @field_validator("amount", "scope", "modules", "importance", "round_to", "max_layer_amount", "calibration_batches",
                     "n", "m")
    @classmethod
    def _for_method(cls, value: Any, info: ValidationInfo) -> Any:
        method, option = info.data.get("method"), str(info.field_name)
        if method is None:  # the method itself is invalid and reported
            return value
        if method not in APPLIES[option]:
            if value is not None:
                raise ValueError(f"'{option}' does not apply to method {method}; it is an option of method "
                                 f"{' and '.join(APPLIES[option])}")
            return None
        if value is None and option == "amount":
            raise PydanticCustomError("missing", "Field required")
        if value is not None:
            return value
        default = DEFAULTS.get((option, method))
        return list(default) if isinstance(default, list) else default  # no list shared between stages

    @field_validator("modules")
    @classmethod
    def _known_layers(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        for name in value or []:
            layer_type(name)
        if info.data.get("method") == "wanda" and value and value != ["Linear"]:
            raise ValueError(f"method wanda prunes Linear layers only, not {', '.join(v for v in value if v != 'Linear')}")
        return value

    @field_validator("m")
    @classmethod
    def _n_below_m(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n")
        if value is not None and n is not None and n >= value:
            raise ValueError(f"n ({n}) must be smaller than m ({value})")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_fit(cls, value: int, info: ValidationInfo) -> int:
        n, m = info.data.get("n"), info.data.get("m")
        if info.data.get("method") == "nm" and n is not None and m is not None and value > m - n:
            raise ValueError(f"{n}:{m} pruning takes at most {m - n} steps (one more zero in each group per step)")
        return value

    @field_validator("finetune_epochs")
    @classmethod
    def _between_steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and "steps" in info.data and info.data["steps"] < 2:
            raise ValueError("fine-tuning runs between steps and needs steps >= 2; to recover after a "
                             "one-step prune, add a distill stage after it")
        return value

    @field_validator("finetune_lr")
    @classmethod
    def _with_finetune(cls, value: float | None, info: ValidationInfo) -> float | None:
        if "finetune_epochs" not in info.data:
            return value
        if info.data["finetune_epochs"] is None:
            if value is not None:
                raise ValueError("'finetune_lr' applies only with finetune_epochs")
            return None
        return 1e-3 if value is None else value

    @model_serializer(mode="wrap")
    def _own_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The resolved recipe (recipe.yaml of a saved model, report.json) shows this method's
        # options with their defaults, not the other methods' (always null here).
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if key not in APPLIES or self.method in APPLIES[key]}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Prune ``model`` in place (removing channels for ``structured``) and return it."""
        if self.method == "structured":
            return self._structured(model, ctx)
        layers, skipped = self._layers(model)
        for step in range(1, self.steps + 1):
            if self.method == "nm":
                self._nm_step(layers, step)
            elif self.method == "wanda":
                self._wanda_step(model, layers, step / self.steps, ctx)
            else:
                self._magnitude_step(layers, step / self.steps)
            self._finetune(model, ctx, step, layers)
        self._report(layers, skipped, ctx)
        return model

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Give a freshly built model the channel counts a structured prune left (weights are loaded after)."""
        return replay(model, record) if record.get("method") == "structured" else model

    def _layers(self, model: nn.Module) -> tuple[list[nn.Module], list[str]]:
        """The layers to prune, and (for nm) the names of chosen layers that cannot follow the pattern."""
        chosen = [(name, m) for name, m in select_layers(model, self.modules or [], self.exclude) if has_weight(m)]
        if not chosen:
            raise StageError(self.label, f"modules {self.modules} (minus exclude {self.exclude}) matched no layer "
                             f"with a weight; the model has: {layer_census(model)}")
        if self.method != "nm":
            return [m for _, m in chosen], []
        m = self.m or 4
        fitting = [layer for _, layer in chosen if fits(weight_of(layer), m)]
        if not fitting:
            raise StageError(self.label, f"no layer among modules {self.modules} has an input dimension divisible "
                             f"by m={m}; N:M groups run along the input channels or features")
        return fitting, [name for name, layer in chosen if not fits(weight_of(layer), m)]

    def _magnitude_step(self, layers: list[nn.Module], fraction: float) -> None:
        amount = (self.amount or 0.0) * fraction
        if self.max_layer_amount is None:
            torch_magnitude(layers, amount, self.scope == "global")
        else:
            capped_magnitude(layers, amount, self.max_layer_amount, self.scope == "global")

    def _wanda_step(self, model: nn.Module, layers: list[nn.Module], fraction: float, ctx: Context) -> None:
        from ._quant_base import batch_inputs
        from ._wanda import input_norms, prune_rows

        named = {name: layer for name, layer in model.named_modules() if any(layer is chosen for chosen in layers)}
        batches = batch_inputs(ctx.data["calibration"], self.calibration_batches or 8)
        try:
            norms = input_norms(model.eval(), named, batches)
        except ValueError as exc:
            raise StageError(self.label, f"method wanda: {exc}") from exc
        for name, layer in named.items():
            prune_rows(layer, norms[name], (self.amount or 0.0) * fraction)

    def _nm_step(self, layers: list[nn.Module], step: int) -> None:
        n, m = self.n or 2, self.m or 4
        zeros = round((m - n) * step / self.steps)
        with torch.no_grad():
            for weight in map(weight_of, layers):
                weight.mul_(nm_mask(weight, m - zeros, m))

    def _structured(self, model: nn.Module, ctx: Context) -> nn.Module:
        try:
            from ._structured import ChannelOptions, ChannelState, prune_step, pruned_fraction
        except ImportError as exc:  # torch-pruning is a dependency, but an environment may lack it
            raise StageError(self.label, f"method structured needs torch-pruning ({exc}); "
                             "pip install 'torch-pruning>=1.6,<2'") from exc
        opts = ChannelOptions(scope=self.scope or "global", norm=1 if self.importance == "l1" else 2,
                              round_to=self.round_to or 1, ceiling=self.max_layer_amount or 0.9, exclude=self.exclude)
        state, before = ChannelState(), snapshot(model)
        example = ctx.example_inputs[:2]
        for step in range(1, self.steps + 1):
            prune_step(model.eval(), example, (self.amount or 0.0) * step / self.steps, opts, state)
            self._finetune(model, ctx, step, None)
        record = changes(before, model)
        if not record["tensors"]:
            raise StageError(self.label, f"no channel could be removed: every prunable layer is an output layer or "
                             f"excluded (left alone: {', '.join(state.protected) or 'none'})")
        ctx.structure.update({"method": "structured", **record})
        removed = pruned_fraction(model, state)
        ctx.add_metric("pruned_channels", removed)
        ctx.add_metric("pruned_layers", sum(1 for values in record["attributes"].values() if values))
        ctx.log.info("  %s: left alone (output or excluded): %s", self.label, ", ".join(state.protected) or "none")
        if removed < (self.amount or 0.0) - 0.02:
            ctx.note(f"{self.label}: removed {removed:.0%} of the prunable channels, not {self.amount:.0%}: the "
                     f"per-layer ceiling (max_layer_amount) or round_to held some layers back")
        return model.eval()

    def _finetune(self, model: nn.Module, ctx: Context, step: int, layers: list[nn.Module] | None) -> None:
        if step == self.steps or not self.finetune_epochs:
            return
        from ._finetune import finetune, zero_masks

        masks = zero_masks(model, layers or [])
        loss = finetune(model, ctx.data["train"], self.finetune_epochs, self.finetune_lr or 1e-3, masks)
        if loss != loss:  # NaN: the loader yielded nothing
            raise StageError(self.label, "finetune_epochs: the train loader yielded no batch")
        ctx.log.info("  prune step %d/%d: fine-tuned, loss %.4f, %s %.2f", step, self.steps, loss,
                     ctx.metric_name, ctx.evaluate(model))
        ctx.add_metric("finetune_loss", loss)

    def _report(self, layers: list[nn.Module], skipped: list[str], ctx: Context) -> None:
        tensors = [weight_of(layer) for layer in layers]
        total = sum(t.numel() for t in tensors)
        zeros = sum(int((t == 0).sum()) for t in tensors)
        ctx.add_metric("pruned_layers", len(layers))
        ctx.add_metric("pruned_sparsity", zeros / total)
        if skipped:
            ctx.add_metric("skipped_layers", len(skipped))
            ctx.log.info("  %s: left dense (input dimension not a multiple of m): %s", self.label, ", ".join(skipped))
        ctx.note(CPU_NOTES[self.method])
