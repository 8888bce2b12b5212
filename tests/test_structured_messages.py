"""When a structured prune removes no channel, its error gives the real reason: every prunable layer is
an output layer or excluded, or a cut broke the model's forward (the group and the exception named)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim import StageError
from torchslim.plugins.prune import StructuredPrune

from .conftest import make_ctx


class GainedConv(nn.Module):
    """A conv whose 8 channels are scaled by a buffer of 8 gains in forward: removing any channel breaks
    the forward (Torch-Pruning does not see the buffer); the head is the output layer, left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)
        self.register_buffer("gain", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)) * self.gain.view(1, 8, 1, 1)
        return self.head(x.mean(dim=(2, 3)))


def test_output_or_excluded_layers_only(flat: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(StageError) as info:
        StructuredPrune(amount=0.5, exclude=["0"]).apply(model, make_ctx(model, flat))
    message = str(info.value)
    assert "no channel could be removed: every prunable layer is an output layer or excluded (left alone: 0, 2)" in message
    assert "left whole" not in message and "forward failed" not in message


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_cut_that_breaks_the_forward_is_named_with_its_exception(images: dict, scope: str) -> None:
    torch.manual_seed(0)
    model = GainedConv().eval()
    with pytest.raises(StageError) as info:
        StructuredPrune(amount=0.5, scope=scope).apply(model, make_ctx(model, images))
    message = str(info.value)
    assert (
        "no channel could be removed: 1 group(s) of coupled channels left whole (conv: the pruned forward "
        "failed (RuntimeError: The size of tensor a (4) must match the size of tensor b (8)" in message
    )
    assert "; cut undone); output or excluded layers left alone: head" in message
    assert "every prunable layer is an output layer or excluded" not in message
    assert model.conv.out_channels == 8 and model(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # the cut was undone
