"""BatchNorm statistics re-estimated after the weights before the norms changed (a prune)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Calibration batches the statistics are re-estimated on: enough for a stable mean and variance
#: of every channel (32 x 64 samples on the digits), few enough to cost less than one eval pass.
RECALIBRATION_BATCHES = 32


def tracking_norms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (and so can hold stale ones)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate(model: nn.Module, loader: Iterable[Any], batches: int = RECALIBRATION_BATCHES) -> int:
    """Reset the running statistics of every BatchNorm of ``model`` and re-estimate them as the exact
    average over up to ``batches`` batches of ``loader`` (inputs only; no gradient, weights untouched).

    Every other layer stays in eval mode (dropout off). Returns the batches used: 0 when the model has
    no BatchNorm or the loader yielded nothing, and then the old statistics are kept.
    """
    norms = tracking_norms(model)
    if not norms:
        return 0
    saved = [(norm, norm.momentum, {k: v.clone() for k, v in norm.state_dict().items()}) for norm in norms]
    training = model.training
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches, not an exponential one
        norm.train()
    try:
        used = _forward(model, loader, batches)
    finally:
        for norm, momentum, _ in saved:
            norm.momentum = momentum
        model.train(training)
    if used == 0:
        for norm, _, state in saved:
            norm.load_state_dict(state)
    return used


def _forward(model: nn.Module, loader: Iterable[Any], batches: int) -> int:
    device = next(model.parameters()).device  # the loader's batches may be on the CPU
    used = 0
    with torch.no_grad():
        for batch in loader:
            if used >= batches:
                break
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(inputs.to(device))
            used += 1
    return used
