"""Figures that mean what they say: MACs of every matrix product, counts of compiled graphs, latency
with its spread and the machine's load, noisy figures marked, precise metrics, stage labels and positions."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim import Context, RecipeError, Registry, Stage, StageEntry, StageError
from torchslim.engine import names
from torchslim.engine.macs import count_macs
from torchslim.engine.metrics import count_nonzero, count_params
from torchslim.engine.noise import latency_noise
from torchslim.engine.report import Report, Row, ratio_text, with_delta, with_ratio
from torchslim.engine.timing import others_running, time_forward, usable_cpus
from torchslim.examples import digits
from torchslim.plugins.quantize import DynamicQuantize, StaticQuantize
from torchslim.plugins.quantize import base as quantize_base
from torchslim.plugins.quantize.base import deprecation_note

from .conftest import digits_recipe, make_ctx, write_recipe

# --- MACs -------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """One head of attention written with matmul, as transformers write it: 3 Linear + 2 products."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(self.q(x), self.k(x).transpose(-1, -2))
        return torch.matmul(scores.softmax(-1), self.v(x))


class Sdpa(nn.Module):
    """Attention through F.scaled_dot_product_attention (torch's fused CPU kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x)


class Mha(nn.Module):
    """nn.MultiheadAttention, whose inference fast path is one fused kernel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class NumpyProduct(nn.Module):
    """A weight matrix applied where no counter can look (as a compiled graph's kernels are)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x.detach().numpy()) @ self.weight.detach().numpy())


L, D = 5, 16  # sequence length and width of the attention examples


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (SelfAttention(D), 3 * L * D * D + 2 * L * L * D),
        (Sdpa(), 2 * L * L * D),
        (Mha(D), 4 * L * D * D + 2 * L * L * D),
    ],
    ids=["matmul", "sdpa", "multihead"],
)
def test_attention_products_are_counted(model: nn.Module, expected: int) -> None:
    # Linear and Conv hooks alone counted 3*L*D*D, 0 and 0 here.
    assert count_macs(model.eval(), torch.randn(1, L, D)) == expected


def test_quantized_attention_model_counts_hooks_and_products() -> None:
    model = SelfAttention(D).eval()
    quantized = DynamicQuantize()._convert(model, [], reduce_range=False)  # int8 kernels the FLOP counter cannot see
    x = torch.randn(1, L, D)
    assert count_macs(quantized, x) == count_macs(model, x) == 3 * L * D * D + 2 * L * L * D


def test_uncountable_model_is_not_measured_rather_than_zero() -> None:
    assert count_macs(NumpyProduct(), torch.randn(2, 4)) is None


class SelfCounting(nn.Module):
    """A module that lists its weights and MACs itself (as torchao's compiled graph does)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 3)  # not listed below: must not be counted as well
        self.register_buffer("int8", torch.tensor([[1, 0], [0, 2]], dtype=torch.int8))

    def counted_weights(self) -> Iterator[torch.Tensor]:
        yield self.int8.float()

    def counted_macs(self, example: torch.Tensor) -> int:
        return 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_module_may_count_itself() -> None:
    model = SelfCounting()
    assert (count_params(model), count_nonzero(model), count_macs(model, torch.zeros(1, 2))) == (4, 2, 7)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed (optional)")
def test_torchao_rows_count_the_graphs_weights_and_macs(images: dict) -> None:
    model = digits.resnet(width=8, blocks=1, train_epochs=0).eval()
    x = next(iter(images["eval"]))[0][:1]
    ctx = make_ctx(model, images)
    compiled = StaticQuantize(backend="torchao", calibration_batches=2).apply(model, ctx)
    fx = StaticQuantize(backend="x86", calibration_batches=2).apply(model, make_ctx(model, images))
    # Before: 82 params (the float biases) and 0 MACs. BatchNorm is folded in both backends.
    assert count_params(compiled) == count_params(fx) == 5050
    assert count_macs(compiled, x) == count_macs(model, x) > 100_000


def test_compiled_model_gets_a_note() -> None:
    from torchslim.engine.headline import compiled_note

    compiled = torch.compile(nn.Linear(2, 2))
    assert "torch.compile'd model against the eager, uncompiled baseline" in (compiled_note("q", compiled) or "")
    assert compiled_note("q", nn.Linear(2, 2)) is None


# --- formatting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "text"),
    [(3.397, "3.40"), (0.00256, "0.00256"), (0.99996, "1.00"), (10.44, "10.44"), (0.128, "0.128")],
    ids=["usual", "tiny", "rounds-up", "large", "below-1"],
)
def test_ratios_never_read_zero(ratio: float, text: str) -> None:
    assert ratio_text(ratio) == text
    assert with_ratio(0.08 / ratio, 0.08, "ms").endswith(f"({text}x)")


@pytest.mark.parametrize(
    ("value", "base", "text"),
    [
        (96.67, 96.11, "96.67 (+0.56)"),
        (0.944, 0.977, "0.9440 (-0.0330)"),
        (0.97702, 0.97700, "0.9770 (+0.000020)"),
        (35.1261, 33.0, "35.13 (+2.13)"),
    ],
    ids=["accuracy", "cosine", "tiny-change", "perplexity"],
)
def test_metric_keeps_four_significant_digits(value: float, base: float, text: str) -> None:
    # Before: the cosine read "0.94 (-0.03)" and the tiny change "+0.00".
    assert with_delta(value, base, False) == text


# --- latency, load and noise --------------------------------------------------------------------


def test_timing_keeps_a_spread_and_the_load() -> None:
    timing = time_forward(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, runs=9, threads=1)
    assert len(timing.samples) == 9 and timing.median > 0 and timing.iqr >= 0
    assert timing.others_running is None or timing.others_running >= 0


def test_spread_or_load_marks_a_latency_noisy() -> None:
    env = {"threads": 2, "cpus": 2, "load_before": 0.1}
    quiet = {names.LATENCY_MS: 1.0, names.LATENCY_IQR_MS: 0.1, names.LATENCY_OTHERS: 0}
    assert latency_noise(quiet, env) is None
    assert "spread over 80%" in (latency_noise({**quiet, names.LATENCY_IQR_MS: 0.8}, env) or "")
    assert "1 other runnable task" in (latency_noise({**quiet, names.LATENCY_OTHERS: 1}, env) or "")
    assert "load average was 5.5" in (latency_noise(quiet, {**env, "load_before": 5.5}) or "")


@pytest.fixture
def busy_machine() -> Iterator[int]:
    """One process spinning on each usable CPU for the test's duration."""
    if others_running() is None:
        pytest.skip("no /proc/loadavg: the machine's load cannot be seen here")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cpus())]
    try:
        yield len(spinners)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_latency_on_a_busy_machine_is_marked_noisy(busy_machine: int, registry: Registry) -> None:
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}], train_epochs=1)
    report = torchslim.run(recipe, registry=registry)
    table = report.table()
    lines = [line.split("\t") for line in report.table("tsv").split("\nnote: ")[0].splitlines()]
    column = [cell.strip() for cell in lines[0]].index("latency ms (x faster)")
    assert [line[column].strip().split(" ")[0][-1] for line in lines[1:]] == ["~", "~"], table
    assert "~ marks a noisy latency" in table and "other runnable task(s)" in table
    assert report.speedup is not None and report.speedup["noisy"], report.speedup


# --- the run's report: speed-up, environment, labels, positions --------------------------------------


@pytest.fixture(scope="module")
def chain() -> Report:
    stages = [{"type": "prune", "amount": 0.3}, {"type": "prune", "amount": 0.6}, {"type": "quantize"}]
    return torchslim.run(digits_recipe(stages), registry=Registry.load(autoload=False))


def test_default_names_are_made_unique(chain: Report) -> None:
    assert [row.stage for row in chain.rows] == ["baseline", "prune", "prune-2", "quantize"]


def test_headline_speedup_is_timed_interleaved(chain: Report) -> None:
    speedup = chain.speedup or {}
    assert speedup["q1"] <= speedup["ratio"] <= speedup["q3"] and speedup["rounds"] == 2
    assert "speed-up of the final model (quantize) over the baseline, both timed interleaved" in chain.notes[0]
    assert "speedup" in chain.to_dict()


def test_environment_records_cpu_and_load(chain: Report) -> None:
    env = chain.environment
    assert env["cpus"] >= 1 and "cpu" in env
    assert {"load_before", "load_after"} <= set(env)
    for row in chain.rows:
        assert row.metrics[names.LATENCY_IQR_MS] >= 0


def test_user_names_are_kept_and_defaults_skip_them() -> None:
    from torchslim.engine.labels import unique_labels

    stages = [StaticQuantize(), DynamicQuantize(name="quantize-2"), DynamicQuantize(), DynamicQuantize()]
    assert unique_labels(stages) == ["quantize", "quantize-2", "quantize-3", "quantize-4"]


def test_duplicate_user_names_are_a_recipe_error(tmp_path: Path, registry: Registry) -> None:
    stages = [
        {"type": "prune", "name": "cut", "amount": 0.3},
        {"type": "distill"},
        {"type": "prune", "name": "cut", "amount": 0.5},
    ]
    path = write_recipe(tmp_path, digits_recipe(stages))
    with pytest.raises(
        RecipeError,
        match=r"recipe.yaml:\d+:\d+: stages\[2\].name \(prune\): 'cut' is already the name "
        r"of stages\[0\] \(.*recipe.yaml:\d+:\d+\)",
    ):
        torchslim.run(path, registry=registry)


class FailStage(Stage):
    """A stage whose work raises."""

    type: Literal["fail"] = "fail"

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Raise."""
        raise ValueError("boom")


def test_stage_error_names_index_type_and_line(tmp_path: Path, registry: Registry) -> None:
    registry.add(StageEntry("fail", "tests", "tests:FailStage", cls=FailStage))
    path = write_recipe(tmp_path, digits_recipe([{"type": "prune", "amount": 0.3}, {"type": "fail"}]))
    with pytest.raises(StageError, match=r"^stage fail: ValueError: boom \(stages\[1\] \(fail\) at .*recipe.yaml:\d+:\d+\)$"):
        torchslim.run(path, registry=registry)


# --- quantize: torch's deprecation note, CPU-only methods on another device -----------------------


def test_deprecation_note_is_true_for_the_installed_torch() -> None:
    text = "torch.ao.quantization is deprecated and will be removed in 2.10."
    after = deprecation_note(text, "2.13.0+cpu")
    assert "will be removed in 2.10" not in after.replace("says it will be removed in 2.10", "")
    assert "(its warning says it will be removed in 2.10, yet torch 2.13.0 still has it)" in after
    assert "will be removed in 2.10;" in deprecation_note(text, "2.9.1")  # still ahead: kept as torch says it
    assert "torch.ao.quantization in one backend module" not in deprecation_note("`torch.jit.script_method` is deprecated.")


class Placed(nn.Sequential):
    """A model that records where it is moved (no GPU is needed to test the placement)."""

    moves: list[Any]

    def to(self, *args: Any, **kwargs: Any) -> Placed:  # type: ignore[override]
        self.moves.append(args[0] if args else kwargs.get("device"))
        return self


class QuietDynamic(DynamicQuantize):
    """Dynamic int8 with notes of its own: where its layers run must not depend on what its notes say."""

    def _caveats(self) -> list[str]:
        return []


@pytest.mark.parametrize(
    ("stage", "moved"),
    [(DynamicQuantize(), True), (StaticQuantize(), True), (StaticQuantize(backend="torchao"), False), (QuietDynamic(), True)],
    ids=["dynamic", "static-x86", "static-torchao", "dynamic-own-notes"],
)
def test_cpu_only_methods_move_the_model_to_the_cpu_first(
    stage: Stage, moved: bool, flat: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Placed(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    model.moves = []
    monkeypatch.setattr(quantize_base, "model_device", lambda m: torch.device("cuda:0"))
    ctx = make_ctx(model, flat)
    ctx.log = logging.getLogger("test")
    assert isinstance(stage, quantize_base.QuantizeStage)
    assert stage._on_cpu_if_needed(model, ctx) is model
    assert model.moves == (["cpu"] if moved else [])
    note = f"{stage.label}: moved the model from cuda:0 to the CPU before quantizing"
    assert any(n.startswith(note) for n in ctx.notes) == moved


@pytest.mark.parametrize("stage", [DynamicQuantize(), QuietDynamic()], ids=["dynamic", "dynamic-own-notes"])
def test_cpu_only_method_says_so_under_the_summary(stage: Stage, flat: dict) -> None:
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    ctx = make_ctx(model, flat)
    stage.apply(model, ctx)
    assert "dynamic quantization runs on the CPU only; quantized layers cannot be trained further" in ctx.notes


@pytest.mark.parametrize(
    ("ratio", "baseline_ms", "final_ms", "plainly"),
    [
        (0.969, 0.220, 0.114, True),  # the issue's figures: per-round median slower, medians' ratio faster
        (1.93, 0.220, 0.114, False),  # both faster: one figure
        (0.8, 0.100, 0.125, False),  # both slower: one figure
    ],
    ids=["opposed", "both-faster", "both-slower"],
)
def test_speedup_whose_two_figures_disagree_is_said_plainly(
    ratio: float, baseline_ms: float, final_ms: float, plainly: bool
) -> None:
    report = Report(recipe={}, rows=[Row("baseline", None, {}), Row("prune", "prune", {})])
    report.speedup = {"ratio": ratio, "q1": 0.771, "q3": 101.9, "rounds": 30, "baseline_ms": baseline_ms, "final_ms": final_ms}
    line = report.measurement_notes()[0]
    assert ("not measured: the median of the per-round ratios is" in line) is plainly, line
    assert (f"of the run: {ratio_text(ratio)}x" in line) is not plainly, line
