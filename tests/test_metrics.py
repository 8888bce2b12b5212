"""Metrics on small models whose figures can be worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.engine.metrics import (
    count_macs,
    count_nonzero,
    count_params,
    latency_batch,
    latency_ms,
    size_bytes,
    torch_threads,
)
from torchslim.plugins.quantize import DynamicQuantize


def test_linear_counts() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert count_params(model) == 4 * 3 + 3 + 3 * 2 + 2
    assert count_macs(model, torch.randn(5, 4)) == 4 * 3 + 3 * 2
    with torch.no_grad():
        model[0].weight[0].zero_()
    assert count_nonzero(model) == count_params(model) - 4


def test_conv_macs_count_groups_and_kernel() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    # Each output element of the first conv costs 4*3*3 MACs, of the depthwise conv 1*3*3.
    assert count_macs(model, torch.randn(2, 4, 6, 6)) == 8 * 6 * 6 * 36 + 8 * 6 * 6 * 9


def test_quantized_linear_is_counted_once() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    quantized = DynamicQuantize()._convert(model, [], reduce_range=False)
    x = torch.randn(3, 16)
    assert count_macs(quantized, x) == count_macs(model, x) == 16 * 8 + 8 * 4
    assert count_params(quantized) == count_params(model)


def test_size_bytes_is_the_saved_file_size(tmp_path) -> None:
    model = nn.Linear(100, 50)
    path = tmp_path / "archive.pt"  # torch.save names the zip's folder after the file: match the in-memory name
    torch.save(model.state_dict(), path)
    assert size_bytes(model) == path.stat().st_size
    assert size_bytes(model) > 100 * 50 * 4


def test_latency_is_positive_and_threads_restored() -> None:
    before = torch.get_num_threads()
    value = latency_ms(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, runs=3, threads=1)
    assert value > 0
    assert torch.get_num_threads() == before
    with torch_threads(1):
        assert torch.get_num_threads() == 1


@pytest.mark.parametrize(("batch", "size"), [(3, 8), (10, 4)], ids=["repeat", "cut"])
def test_latency_batch(batch: int, size: int) -> None:
    example = torch.arange(batch * 2, dtype=torch.float32).view(batch, 2)
    out = latency_batch(example, size)
    assert out.shape == (size, 2)
    assert torch.equal(out[0], example[0])
