"""A model whose exported graph computes other outputs than eager torch: the parity check must catch it.

Real cases are an op a runtime implements differently, or a forward that branches on Python state the
exporter freezes; here the exported graph scales the outputs by 1.001, whatever the machine's kernels
(an ONNX Runtime that matched torch to the last bit on the plain MLP made a tolerance-only test pass).
"""

from __future__ import annotations

import torch
from torch import nn

from torchslim.examples import digits


class ExportDrift(nn.Module):
    """The digits MLP; 0.1% larger outputs in the exported graph than in eager torch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y * 1.001 if torch.onnx.is_in_onnx_export() else y


def mlp(hidden: int = 32, train_epochs: int = 1) -> nn.Module:
    """The drifting MLP (the bundled digits MLP inside)."""
    return ExportDrift(digits.mlp(hidden=hidden, train_epochs=train_epochs))
