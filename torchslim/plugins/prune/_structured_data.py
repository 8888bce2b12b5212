"""Structured pruning with calibration data: channels ranked by what their loss would cost the layers
that read them (``importance: activation`` and ``obs``), and Linear layers that lost inputs refit by least squares
to the unpruned model's outputs (``refit``).

Magnitude ranks a channel by its weights alone. A channel whose weights are large but whose activation
is nearly always small (or the reverse) is ranked wrongly; in a trained transformer the spread of
activations between features is wide. ``activation`` scores channel ``j`` by the energy it sends
downstream, ``sum over readers of ||W[:, j]||^2 * E[x_j^2]``, measured on the calibration data;
``obs`` by the part of it a refit of the Linear readers could not recover (``E[x_j^2]`` replaced by
``1 / [E[x x^T]^-1]_jj``): a channel that others can stand in for ranks low however much it carries.

A cut leaves the readers' remaining weights as they were, tuned to inputs that included the removed
channels. ``refit`` solves, per Linear reader, ``min ||X_kept W'^T + b' - (X W^T + b)||^2`` over the
calibration rows (the unpruned model's inputs to that layer), a small ridge term keeping the solve
stable: the kept inputs and the bias absorb what the removed ones carried (the bias their mean). Only
``X^T X`` is accumulated, so the rows are never stored.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._layers import feed_inputs

RIDGE = 1e-3
"""The ridge term of the refit and of the compensated scale, as a fraction of the mean diagonal of the
inputs' Gram matrix."""


def _rows(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
    """The layer's input as rows of features (a Linear's last dim, a convolution's channels), or None."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and inputs.dim() == 4:
        return inputs.transpose(1, -1).reshape(-1, inputs.shape[1])
    return None


def _as_rows(add: Callable[[nn.Module, torch.Tensor], None]) -> Callable[[nn.Module, torch.Tensor], None]:
    """``add(layer, rows)`` for the layers whose input reads as rows of features (see :func:`_rows`)."""

    def take(layer: nn.Module, inputs: torch.Tensor) -> None:
        rows = _rows(layer, inputs)
        if rows is not None:
            add(layer, rows)

    return take


def input_scales(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    compensated: bool = False,
    moments: dict[nn.Module, torch.Tensor] | None = None,
) -> dict[nn.Module, torch.Tensor]:
    """Per input feature of every Linear and ungrouped Conv2d of ``model``, on the batches: the mean square
    ``E[x_j^2]`` (what removing feature j costs the layer's output per unit of squared weight), or, with
    ``compensated``, for Linear layers, ``1 / [(E[x x^T] + ridge)^-1]_jj`` (the same cost once the other
    inputs and the bias have been refit to take over: Optimal Brain Surgeon's saliency; Hassibi and Stork,
    1993). The second needs each Linear layer's ``in_features^2`` second-moment matrix in memory; given
    ``moments``, those matrices are left in it (the refit of the same pass fits to them)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    sums: dict[nn.Module, list[Any]] = {}

    def add(layer: nn.Module, rows: torch.Tensor) -> None:
        total = sums.setdefault(layer, [0.0, 0])
        if compensated and isinstance(layer, nn.Linear):
            rows = _with_ones(rows, layer)
            total[0] = total[0] + rows.T @ rows
        else:
            total[0] = total[0] + rows.float().pow(2).sum(dim=0).cpu()
        total[1] += rows.shape[0]

    feed_inputs(model, layers, batches, _as_rows(add))
    means = {layer: total / max(count, 1) for layer, (total, count) in sums.items()}
    if moments is not None:
        moments.update((layer, mean) for layer, mean in means.items() if mean.dim() == 2)
    return {layer: _scale(layer, mean) for layer, mean in means.items()}


def _with_ones(rows: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """The rows in float64, with a column of ones when the layer has a bias (the bias is fit with the weights)."""
    rows = rows.double().cpu()
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], dim=1) if layer.bias is not None else rows


def _ridge(gram: torch.Tensor) -> torch.Tensor:
    return RIDGE * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)


def _scale(layer: nn.Module, moment: torch.Tensor) -> torch.Tensor:
    """Per-feature scale from a mean square (a vector) or a second-moment matrix (see :func:`input_scales`)."""
    if moment.dim() == 1:
        return moment
    inverse: torch.Tensor = torch.linalg.inv(moment + _ridge(moment)).diagonal()
    assert isinstance(layer, nn.Linear)
    # A refit never costs more than no refit: without the min, the ridge would give an input that is
    # always 0 (a dead neuron) a cost above zero.
    plain = moment.diagonal()[: layer.in_features]
    return torch.minimum(1.0 / inverse[: layer.in_features], plain).float()


class ActivationImportance:
    """A Torch-Pruning group scorer: for each channel, the sum over the layers reading it of its weight
    column's squared norm times that input's scale (:func:`input_scales`), relative to the group's mean;
    a group with no measured reader is scored by ``fallback``."""

    def __init__(self, scales: dict[nn.Module, torch.Tensor], fallback: Any) -> None:
        self.scales, self.fallback = scales, fallback

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        import torch_pruning as tp

        readers = (tp.prune_linear_in_channels, tp.prune_conv_in_channels)
        total: torch.Tensor | None = None
        for i, (dep, idxs) in enumerate(group):
            layer, root = dep.layer, group[i].root_idxs
            if dep.pruning_fn not in readers or layer not in self.scales or any(r is None for r in root):
                continue
            columns = layer.weight.detach().transpose(0, 1).flatten(1).pow(2).sum(dim=1).float().cpu()
            local = (columns * self.scales[layer])[list(idxs)]
            total = torch.zeros(len(group[0].root_idxs)) if total is None else total
            total.scatter_add_(0, torch.tensor(root), local)
        if total is None:
            fallback: torch.Tensor | None = self.fallback(group)
            return fallback
        mean = total.mean()
        return total / mean if mean > 0 else total


@dataclass
class Lost:
    """What one pass's cuts took from a Linear layer: the indices (numbered as before the pass) it keeps."""

    kept_in: list[int]
    kept_out: list[int]


@dataclass
class Removal:
    """The input and output indices one cut removes from a Linear layer, and its sizes before the cut."""

    sizes: tuple[int, int]
    ins: set[int]
    outs: set[int]


def removed_by(plan: Any) -> dict[nn.Module, Removal]:
    """What a Torch-Pruning plan removes from each Linear layer (read before the plan runs)."""
    import torch_pruning as tp

    removed: dict[nn.Module, Removal] = {}
    for dep, idxs in plan:
        layer = dep.layer
        # == not `is`: the pruning functions are bound methods, a new object on every attribute access
        if isinstance(layer, nn.Linear) and dep.pruning_fn in (tp.prune_linear_in_channels, tp.prune_linear_out_channels):
            entry = removed.setdefault(layer, Removal((layer.in_features, layer.out_features), set(), set()))
            (entry.ins if dep.pruning_fn == tp.prune_linear_in_channels else entry.outs).update(int(i) for i in idxs)
    return removed


def record_cut(lost: dict[nn.Module, Lost], removed: dict[nn.Module, Removal]) -> None:
    """Fold one cut's removals (numbered as the layer was just before it) into the pass's ``lost``."""
    for layer, removal in removed.items():
        entry = lost.setdefault(layer, Lost(list(range(removal.sizes[0])), list(range(removal.sizes[1]))))
        entry.kept_in = [k for i, k in enumerate(entry.kept_in) if i not in removal.ins]
        entry.kept_out = [k for i, k in enumerate(entry.kept_out) if i not in removal.outs]


@dataclass
class RefitResult:
    """Layers refit and their relative output error on the calibration rows, without and with the refit."""

    layers: list[str]
    error_cut: float
    error_refit: float


def refit(
    model: nn.Module,
    teacher: nn.Module,
    lost: dict[nn.Module, Lost],
    batches: Iterable[torch.Tensor],
    moments: dict[nn.Module, torch.Tensor] | None = None,
) -> RefitResult:
    """Refit every Linear layer of ``model`` that lost inputs in this pass to the outputs ``teacher`` (the
    model before the pass) gives on the batches; returns the layers and their mean relative errors.
    ``moments`` (by ``model``'s layers, measured before the cut on the same batches: ``importance: obs``)
    spares the pass over the batches for the layers it holds."""
    names = {module: name for name, module in model.named_modules()}
    in_teacher = dict(teacher.named_modules())
    todo = {
        in_teacher[names[layer]]: (layer, entry)
        for layer, entry in lost.items()
        if layer in names and len(entry.kept_in) < in_teacher[names[layer]].in_features
    }
    if not todo:
        return RefitResult([], 0.0, 0.0)
    grams: dict[nn.Module, torch.Tensor] = {}

    def add(layer: nn.Module, rows: torch.Tensor) -> None:
        assert isinstance(layer, nn.Linear)
        rows = _with_ones(rows, layer)
        grams[layer] = grams.get(layer, 0) + rows.T @ rows

    for original, (layer, _) in todo.items():
        if moments and layer in moments:
            grams[original] = moments[layer]
    missing = [original for original in todo if original not in grams]
    if missing:
        feed_inputs(teacher, missing, batches, _as_rows(add))
    errors = [_solve(original, *todo[original], grams[original]) for original in todo if original in grams]
    cut = sum(e[0] for e in errors) / max(len(errors), 1)
    after = sum(e[1] for e in errors) / max(len(errors), 1)
    return RefitResult([names[todo[t][0]] for t in todo if t in grams], cut, after)


def _solve(original: nn.Module, layer: nn.Module, entry: Lost, gram: torch.Tensor) -> tuple[float, float]:
    """Write the least-squares weights into ``layer``; its relative output error before and after."""
    assert isinstance(original, nn.Linear) and isinstance(layer, nn.Linear)
    weight = original.weight.detach().double().cpu()
    # The gram has a ones column when the layer has a bias (the bias absorbs the removed inputs' mean);
    # without one, the weights alone are fit.
    full = weight if original.bias is None else torch.cat([weight, original.bias.detach().double().cpu()[:, None]], dim=1)
    full = full[entry.kept_out]
    kept = entry.kept_in + ([weight.shape[1]] if original.bias is not None else [])
    sub = gram[kept][:, kept]
    solved = torch.linalg.solve(sub + _ridge(sub), (full @ gram[:, kept]).T).T
    energy = float(((full @ gram) * full).sum())

    def error(new: torch.Tensor) -> float:
        placed = torch.zeros_like(full)
        placed[:, kept] = new
        diff = placed - full
        return float(((diff @ gram) * diff).sum()) / energy if energy > 0 else 0.0

    before, after = error(full[:, kept]), error(solved)
    with torch.no_grad():
        layer.weight.copy_(solved[:, : len(entry.kept_in)].to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(solved[:, -1].to(layer.bias.dtype))
    return before, after


def snapshot(model: nn.Module) -> nn.Module:
    """The model as it is before a pass's cuts: what the refit layers are fit to.

    Some models cache tensors computed in a forward pass as plain attributes (timm's LeViT and
    EfficientFormer keep their attention biases so); after the graph's traced forward those carry
    autograd history, which ``copy.deepcopy`` refuses. The copy takes them detached."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in module.__dict__.values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, torch.Tensor) and item.grad_fn is not None:
                    memo[id(item)] = item.detach().clone()
    return copy.deepcopy(model, memo)
