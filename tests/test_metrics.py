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


GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_macs(kind: str, inputs: int, hidden: int, layers: int = 1, directions: int = 1, proj: int = 0) -> int:
    """MACs of one time step: per layer and direction, gates * (input * hidden + state * hidden) [+ hidden * proj]."""
    state, total = proj or hidden, 0
    for layer in range(layers):
        width = inputs if layer == 0 else state * directions
        total += directions * (GATES[kind] * (width * hidden + state * hidden) + hidden * proj)
    return total


RECURRENT = [  # kind, layers, bidirectional, batch_first, proj_size
    ("LSTM", 1, False, True, 0),
    ("LSTM", 2, True, False, 0),
    ("LSTM", 2, True, True, 5),
    ("GRU", 1, False, False, 0),
    ("GRU", 2, True, True, 0),
    ("RNN", 3, True, True, 0),
]


@pytest.mark.parametrize(
    ("kind", "layers", "bidirectional", "batch_first", "proj"),
    RECURRENT,
    ids=[f"{k}-{n}layer{'-bi' if b else ''}{'-bf' if f else ''}{f'-proj{p}' if p else ''}" for k, n, b, f, p in RECURRENT],
)
def test_recurrent_layer_macs_follow_the_formula(
    kind: str, layers: int, bidirectional: bool, batch_first: bool, proj: int
) -> None:
    extra = {"proj_size": proj} if proj else {}
    layer = getattr(nn, kind)(6, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **extra)
    model = nn.Sequential(layer).eval()
    x = torch.randn(3, 7, 6)  # batch 3 x 7 steps (batch_first), or 3 steps x batch 7: 21 steps in all either way
    expected = 21 * recurrent_macs(kind, 6, 8, layers, 2 if bidirectional else 1, proj) // 3  # per sample of dim 0
    assert count_macs(model, x) == expected
    if kind != "LSTM" and not proj:  # torch's own FLOP counter sees these products (not the CPU LSTM's kernel)
        flops = torch.utils.flop_counter.FlopCounterMode(display=False)
        with flops:
            model(x)
        assert flops.get_total_flops() // 2 == 3 * expected


@pytest.mark.parametrize("dtype", ["qint8", "float16"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dynamic_quantized_recurrent_layers_keep_their_macs_and_params(kind: str, dtype: str) -> None:
    model = nn.Sequential(nn.Embedding(20, 6), getattr(nn, kind)(6, 8, num_layers=2, bidirectional=True, batch_first=True))
    quantized = DynamicQuantize(modules=[kind], dtype=dtype)._convert(model, [], reduce_range=True)
    tokens = torch.randint(0, 20, (2, 5))
    assert count_macs(quantized, tokens) == count_macs(model, tokens) == 5 * recurrent_macs(kind, 6, 8, 2, 2)
    assert count_params(quantized) == count_params(model)  # the packed weights count as the float ones did


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_cells_and_packed_sequences_are_counted(kind: str) -> None:
    cell = nn.Sequential(getattr(nn, f"{kind}Cell")(6, 8))
    x = torch.randn(4, 6)
    per_step = recurrent_macs(kind, 6, 8)
    quantized = DynamicQuantize(modules=[f"{kind}Cell"])._convert(cell, [], reduce_range=True)
    assert count_macs(cell, x) == count_macs(quantized, x) == per_step
    assert count_params(quantized) == count_params(cell)
    # Two sequences of 5 and 3 steps: 8 steps in all, not the padded 10.
    assert count_macs(PackedRun(getattr(nn, kind)(6, 8, batch_first=True)), torch.randn(2, 5, 6)) == 8 * per_step // 2


class PackedRun(nn.Module):
    """A recurrent layer over a packed batch of two sequences, 5 and 3 steps long."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
        return self.layer(packed)[0].data


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
