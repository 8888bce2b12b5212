"""Structured pruning: whole channels and neurons removed, so that the model is really smaller and faster."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from .._calibration import Calibration
from .._layers import check_patterns
from ._mha import settle
from ._shapes import changes, replay, snapshot
from .base import Fraction, PruneStage

if TYPE_CHECKING:
    from ._structured import ChannelOptions, ChannelState
    from ._structured_branches import Reach


class StructuredPrune(PruneStage):
    """Remove whole output channels and neurons, with the layers coupled to them (BatchNorms,
    residual shortcuts, depthwise convs, concatenations), traced by torch-pruning; attention (projections
    whose outputs the graph splits into heads, and ``nn.MultiheadAttention``) loses whole heads."""

    method: Literal["structured"] = "structured"
    """``structured``: remove whole output channels / neurons (with the layers coupled to them)."""
    amount: Fraction
    """Fraction of the prunable channels removed, between 0 and 1 (exclusive); attention heads are
    counted apart (``head_amount``)."""
    head_amount: float | None = Field(default=None, ge=0, lt=1)
    """Fraction of each attention layer's heads removed, whole heads ranked within the layer, between 0
    (keep every head) and 1 (exclusive); at least one head is always left. Null: ``amount``."""
    scope: Literal["global", "layer"] = "global"
    """``global`` ranks the channels of all groups together; ``layer`` removes ``amount`` of each
    group of coupled channels."""
    importance: Literal["l1", "l2", "activation", "obs"] = "l1"
    """Channel importance: the L1 or L2 norm of its weights, averaged over the coupled layers; or, measured
    on the calibration data, ``activation``: the energy the channel sends to the layers that read it (the
    sum over readers of its weight column's squared norm times its input's mean square; Linear and
    ungrouped Conv2d readers; a group with no such reader is ranked by L2); ``obs``: the part of that
    energy a least-squares refit of the Linear readers could not recover (Optimal Brain Surgeon's
    saliency; keeps each Linear layer's in_features^2 input second moments in memory; pairs with ``refit``)."""
    refit: bool = False
    """After the cut, refit each Linear layer that lost inputs by least squares on the calibration data,
    so that its outputs match the unpruned model's (its bias absorbs the removed inputs' mean). Convolutions
    are not refit."""
    calibration_batches: int = Field(default=16, ge=1)
    """Batches of the calibration data that the measured importances (``activation``, ``obs``) and ``refit``
    run on; where the example inputs do not reach every layer (a forward that branches on its data), these
    batches are searched for inputs that do, and the graph is traced on those too."""
    round_to: int = Field(default=1, ge=1)
    """Leave channel counts that are multiples of this (e.g. 8), for kernel-friendly shapes (1: no rounding)."""
    max_layer_amount: Fraction = 0.9
    """Most any one group may lose, as a fraction of its channels, so that global ranking cannot
    wipe out a small layer."""
    layer_pruners: dict[str, str] = Field(default_factory=dict)
    """Layer types of your own that Torch-Pruning does not know, each with the class that cuts its channels:
    ``{"mypackage.layers:GainConv": "mypackage.pruning:GainConvPruner"}`` (``module:attribute`` targets; the
    pruner implements ``torchslim.plugins.prune.LayerPruner`` and is built with no arguments). Such a layer
    roots a group of coupled channels, as Conv and Linear layers do. Not needed for a Conv or Linear subclass
    whose extra tensors hold one entry per output channel in their leading dimension: those are cut along."""
    group_amounts: dict[str, Annotated[float, Field(ge=0, lt=1)]] = Field(default_factory=dict)
    """With ``scope: layer``: the fraction removed from some groups of coupled channels, by the name of the
    group's root layer (fnmatch patterns; the first that matches wins; 0 leaves a group whole), instead of
    ``amount``, within ``max_layer_amount``. ``torchslim sensitivity`` lists the groups; a search's
    ``per_group`` space sets this (docs/search.md)."""
    time_limit: float | None = Field(default=None, gt=0)
    """Seconds each step may take (null: no limit). Tracing the dependency graph, listing and scoring its groups
    get 70% of it: tracing that has not finished by then fails the stage with a clear error, listing stops and the
    groups listed so far are pruned; one group that takes over 10% of it to list is left whole; the cuts stop at
    the limit, the groups not reached left whole. The log has a progress line every 10 s."""
    time_limit_clock: Literal["wall", "cpu"] = "wall"
    """How ``time_limit`` is counted: ``wall`` seconds, or ``cpu``: the CPU seconds of this process (all its threads
    together), a limit that a busy machine does not shorten (a benchmark run beside other work)."""

    #: The :class:`torchslim.engine.hooks.PerUnit` hook: one amount per group of coupled channels.
    unit_kind: ClassVar[str] = "group"
    unit_setting: ClassVar[str] = "amount"
    unit_option: ClassVar[str] = "group_amounts"

    def _problems(self) -> list[tuple[str, str]]:
        """The family's checks, and a head_amount that the per-layer ceiling would cut short."""
        problems = super()._problems()
        if self.group_amounts and self.scope != "layer":
            problems.append(
                (
                    "group_amounts",
                    "group_amounts sets each group's own amount: it needs scope: layer "
                    "(global ranks the channels of every group together)",
                )
            )
        if self.head_amount is not None and self.head_amount > self.max_layer_amount:
            problems.append(
                (
                    "head_amount",
                    f"head_amount {self.head_amount:g} is more than max_layer_amount "
                    f"{self.max_layer_amount:g}, the most any layer may lose; raise "
                    "max_layer_amount too",
                )
            )
        return problems

    def units(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        """The groups of coupled channels this prune would cut, by root layer name (the ``PerUnit`` hook)."""
        _need_torch_pruning(self.label)
        from ._structured import group_names

        return group_names(model, example[:2], self._options(None), logging.getLogger("torchslim"))

    def uniform_setting(self) -> float:
        """The ``amount`` every group loses under ``scope: layer``."""
        return self.amount

    def alone(self, unit: str, setting: float, units: Sequence[str]) -> StructuredPrune:
        """This prune removing ``setting`` of the group rooted at ``unit``'s channels, and nothing else, in one step."""
        return self.model_copy(
            update={
                "scope": "layer",
                "group_amounts": {unit: setting, "*": 0.0},
                "steps": 1,
                "finetune_epochs": None,
                "finetune_lr": None,
                "head_amount": 0.0,
            }
        )

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Remove channels and return the smaller model; the new shapes are recorded for :meth:`restore`."""
        before = snapshot(model)
        state = self._remove_channels(model, ctx)
        unused = [p for p in self.group_amounts if p != "*" and not any(fnmatch.fnmatchcase(n, p) for n in state.original)]
        if unused:
            raise StageError(
                self.label,
                f"group_amounts: {', '.join(unused)} names no group of coupled channels; the "
                f"groups (by root layer): {', '.join(state.original) or 'none'}",
            )
        record = changes(before, model)
        if not record["tensors"] and state.original and self._all_zero(state.original):
            # Asked for nothing (a search's trial may give every group 0): the model as it came, said so.
            ctx.log.warning("  %s: group_amounts gives every group 0: nothing cut", self.label)
            ctx.note(f"{self.label}: changed nothing: group_amounts gives every group of coupled channels 0")
            ctx.keep_input()
            return model.eval()
        if not record["tensors"]:
            from ._structured import nothing_removed

            raise StageError(self.label, nothing_removed(state))
        ctx.record_for_restore(**record)
        self._report(model, state, record, ctx)
        return model.eval()

    def _all_zero(self, groups: Iterable[str]) -> bool:
        """Whether ``group_amounts`` gives each of ``groups`` 0 (the first matching pattern; ``amount`` otherwise)."""
        from ._structured_choice import own_amount

        return all(own_amount(g, self.group_amounts, self.amount) == 0 for g in groups)

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Give a freshly built model the channel and head counts this prune left (the weights are loaded after)."""
        model = replay(model, record)
        settle(model)  # a pruned nn.MultiheadAttention gets the forward that reads its heads' widths
        return model

    def _remove_channels(self, model: nn.Module, ctx: Context) -> ChannelState:
        _need_torch_pruning(self.label)
        check_patterns(model, self.exclude, "exclude", self.label)
        from ._structured import ChannelState, prune_step
        from ._structured_clock import GraphTimeout
        from ._structured_trace import TraceFailure

        state, example = ChannelState(), ctx.example_inputs[:2]
        options = replace(self._options(ctx), reach=self._reach(model, example, ctx))
        for step in range(1, self.steps + 1):
            heads = None if self.head_amount is None else self.head_amount * step / self.steps
            share = {p: a * step / self.steps for p, a in self.group_amounts.items()}
            try:
                prune_step(
                    model.eval(),
                    example,
                    self.amount * step / self.steps,
                    replace(options, group_amounts=share),
                    state,
                    ctx.log,
                    self.time_limit,
                    heads,
                    self.time_limit_clock == "cpu",
                )
            except GraphTimeout as exc:
                raise StageError(
                    self.label,
                    f"{exc} ({_progress(state.listed)}); raise time_limit, or exclude the "
                    "layers that make the graph large: a layer whose output is reshaped across its "
                    "channel axis (attention's query, key and value, often) makes Torch-Pruning map "
                    "each channel to many indices",
                ) from exc
            except TraceFailure as exc:
                raise StageError(self.label, str(exc)) from exc
            self._finetune(model, ctx, step)
        self._report_reach(options.reach, ctx)  # after the trace: which unreached modules it could probe
        return state

    def _options(self, ctx: Context | None) -> ChannelOptions:
        from ._structured import ChannelOptions

        return ChannelOptions(
            scope=self.scope,
            norm=1 if self.importance == "l1" else 2,
            round_to=self.round_to,
            ceiling=self.max_layer_amount,
            exclude=self.exclude,
            measured=_MEASURED.get(self.importance),
            refit=self.refit,
            batches=None if ctx is None else self._calibration(ctx),
            pruners=self._pruners(),
        )

    def _pruners(self) -> dict[Any, Any]:
        """The ``layer_pruners`` imported and built; a stage error names the pair that is not usable."""
        from ...engine.errors import RecipeError
        from ...engine.specs import import_target
        from ._structured_layers import resolved

        try:
            return resolved(self.layer_pruners, import_target)
        except (RecipeError, ValueError) as exc:
            raise StageError(self.label, str(exc)) from exc

    def _reach(self, model: nn.Module, example: Any, ctx: Context) -> Reach | None:
        """Calibration inputs that reach layers the example does not (a forward that branches on its data), and
        probes of the layers none of ``calibration_batches`` reaches (``_structured_branches``); None: all ran."""
        from ._structured_branches import find_reach

        def batches() -> Iterator[Any]:  # read only when a layer is not reached by the example
            yield from Calibration.of(ctx, self.calibration_batches)

        found = find_reach(model.eval(), example, batches())
        if found.inputs:
            ctx.log.info(
                "  %s: %d calibration batch(es) reach layers the example inputs do not (a forward that "
                "branches on its data): the graph is traced, and each cut checked, on them too",
                self.label,
                len(found.inputs),
            )
        return found if found.inputs or found.unreached else None

    def _report_reach(self, reach: Reach | None, ctx: Context) -> None:
        for note in reach.notes() if reach is not None else []:
            ctx.log.warning("  %s: %s", self.label, note)
            ctx.note(f"{self.label}: {note}")

    def _calibration(self, ctx: Context) -> Calibration | None:
        """The calibration inputs, when the importance or the refit measures on them."""
        if self.importance not in _MEASURED and not self.refit:
            return None
        return Calibration.of(ctx, self.calibration_batches)

    def _report(self, model: nn.Module, state: ChannelState, record: Mapping[str, Any], ctx: Context) -> None:
        from ._structured import pruned_fraction

        removed = pruned_fraction(model, state)
        ctx.add_metric("pruned_channels", removed)
        ctx.add_metric("pruned_layers", sum(1 for values in record["attributes"].values() if values))
        ctx.log.info("  %s: left alone (output or excluded): %s", self.label, ", ".join(state.protected) or "none")
        self._report_heads(state, ctx)
        self._report_refit(state, ctx)
        for name, reason in state.skipped.items():
            ctx.log.info("  %s: left %s whole: %s", self.label, name, reason)
        if state.skipped:
            shown = "; ".join(f"{name}: {reason}" for name, reason in list(state.skipped.items())[:3])
            more = f" (and {len(state.skipped) - 3} more, in the log)" if len(state.skipped) > 3 else ""
            ctx.note(
                f"{self.label}: {len(state.skipped)} group(s) of coupled channels left whole, their share "
                f"given to the others: {shown}{more}"
            )
        if state.original and removed < self.amount - 0.02:
            ctx.note(
                f"{self.label}: removed {removed:.0%} of the prunable channels, not {self.amount:.0%}: {_shortfall(self, state)}"
            )

    def _report_heads(self, state: ChannelState, ctx: Context) -> None:
        """Heads removed (a figure and the log, per attention module), or a note when head_amount found no heads."""
        if state.heads:
            ctx.add_metric("pruned_heads", sum(state.heads.values()))
            ctx.log.info(
                "  %s: attention heads removed: %s",
                self.label,
                ", ".join(f"{name} -{count}" for name, count in state.heads.items()),
            )
        elif self.head_amount and not state.original_heads:
            ctx.note(
                f"{self.label}: head_amount={self.head_amount:g} removed no head: no attention layer "
                "pruned by whole heads was found (a Linear layer whose output is reshaped into heads on "
                "its way to the attention product, or an nn.MultiheadAttention), or the excluded patterns "
                "cover them"
            )

    def _report_refit(self, state: ChannelState, ctx: Context) -> None:
        """The layers refit and how much closer to the unpruned outputs they came, or why none was."""
        if not self.refit:
            return
        layers = sorted({name for result in state.refits for name in result.layers})
        if not layers:
            ctx.note(f"{self.label}: refit changed nothing: no Linear layer lost inputs (convolutions are not refit)")
            return
        ctx.add_metric("refit_layers", len(layers))
        done = [r for r in state.refits if r.layers]
        cut, after = (sum(getattr(r, k) for r in done) / len(done) for k in ("error_cut", "error_refit"))
        ctx.note(
            f"{self.label}: refit {len(layers)} Linear layer(s) on the calibration data: relative output error "
            f"{cut:.4g} after the cut, {after:.4g} after the refit (mean over layers)"
        )


_MEASURED = {"activation": "energy", "obs": "compensated"}
"""The importances measured on the calibration data, and the scale each ranks by (``_structured_data``)."""


def _shortfall(stage: StructuredPrune, state: ChannelState) -> str:
    """The true reason less than the amount was removed."""
    reasons = []
    if state.skipped:
        reasons.append(
            f"{len(state.skipped)} group(s) could not be pruned (named in the notes and the log) and "
            "the others could not take all of their share"
        )
    reasons.append(
        f"the per-layer ceiling (max_layer_amount={stage.max_layer_amount:g})"
        + (f" or round_to={stage.round_to}" if stage.round_to > 1 else "")
        + " held the other groups back"
    )
    return "; ".join(reasons)


def _need_torch_pruning(label: str) -> None:
    # torch-pruning is a dependency, but an environment may lack it: say how to get it.
    try:
        import torch_pruning  # noqa: F401
    except ImportError as exc:
        raise StageError(label, f"method structured needs torch-pruning ({exc}); pip install 'torch-pruning>=1.6,<2'") from exc


def _progress(listed: list[str]) -> str:
    """How far listing the groups got before the time limit."""
    if not listed:
        return "no group listed yet"
    return f"{len(listed)} group(s) listed, the last rooted at {listed[-1]}"
