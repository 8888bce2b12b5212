"""Structured pruning where Torch-Pruning's graph builder fails, and its time limit through every phase: a
dual-path network's concatenations of channel slices are repaired from autograd's record or, where not, left
whole while the rest is pruned; a graph that cannot be built names the library, the phase and what to try;
tracing, listing one group, and cutting each stop within their share of ``time_limit``, with progress lines."""

from __future__ import annotations

import logging
import re
import time

import pytest
import torch
from torch import nn

from torchslim import StageError
from torchslim.plugins.prune import StructuredPrune
from torchslim.plugins.prune import _structured_clock as clock_module
from torchslim.plugins.prune._structured import ChannelOptions, ChannelState, prune_step, pruned_fraction
from torchslim.plugins.prune._structured_clock import Clock, GraphTimeout, GroupTimeout

from .conftest import make_ctx


class DualPath(nn.Module):
    """Dual-path blocks (as DPN's): each adds to a residual part and grows a dense part by concatenating a slice
    of its input with new channels. Eight blocks are deeper than Torch-Pruning's channel inference reaches;
    ``pad`` concatenates a constant channel too (no gradient: autograd records no size for it)."""

    def __init__(self, blocks: int = 8, res: int = 8, inc: int = 4, pad: int = 0) -> None:
        super().__init__()
        self.res, self.pad = res, pad
        self.stem = nn.Conv2d(1, res + inc, 3, padding=1)
        widths = [res + (inc + pad) * (i + 1) - pad for i in range(blocks + 1)]
        self.reduce = nn.ModuleList(nn.Conv2d(widths[i], 8, 1) for i in range(blocks))
        self.expand = nn.ModuleList(nn.Conv2d(8, res + inc, 3, padding=1) for _ in range(blocks))
        self.classifier = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for reduce, expand in zip(self.reduce, self.expand, strict=True):
            y = expand(torch.relu(reduce(x)))
            parts = [x[:, : self.res] + y[:, : self.res], x[:, self.res :], y[:, self.res :]]
            x = torch.cat(parts + [torch.zeros_like(y[:, : self.pad])] * (self.pad > 0), dim=1)
        return self.classifier(x.mean(dim=(2, 3)))


EXAMPLE = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def test_torch_pruning_alone_cannot_build_the_dual_path_graph() -> None:
    import torch_pruning as tp

    with pytest.raises(TypeError, match="unsupported operand"):  # the premise of the tests below
        tp.DependencyGraph().build_dependency(DualPath().eval(), example_inputs=EXAMPLE, verbose=False)


def test_concatenation_sizes_from_autograd_let_the_dual_path_network_prune_whole(images: dict) -> None:
    torch.manual_seed(0)
    model = DualPath().eval()
    ctx = make_ctx(model, images)
    stage = StructuredPrune(amount=0.3)
    out = stage.apply(model, ctx)
    assert ctx.metrics["pruned_channels"] == pytest.approx(0.3, abs=0.03)
    assert all(conv.out_channels < 8 for conv in out.reduce)
    rebuilt = stage.restore(DualPath().eval(), ctx.restore_record)
    rebuilt.load_state_dict(out.state_dict(), strict=True)
    x = ctx.example_inputs
    assert out(x).shape == (x.shape[0], 10) and torch.equal(rebuilt.eval()(x), out(x))


def test_a_concatenation_that_cannot_be_mapped_leaves_its_groups_whole_and_the_rest_is_pruned() -> None:
    torch.manual_seed(0)
    model, state = DualPath(pad=1).eval(), ChannelState()
    prune_step(model, EXAMPLE, 0.3, ChannelOptions("global", 1, 1, 0.9, []), state)
    reason = state.skipped["expand.7"]
    assert reason.startswith("its channels reach the concat operation fed by expand.7")
    assert "whose channel indices Torch-Pruning could not map (TypeError: unsupported operand" in reason
    assert model.expand[7].out_channels == 12 and pruned_fraction(model, state) == pytest.approx(0.3, abs=0.03)
    assert model(EXAMPLE).shape == (2, 10)


class TaggedOutput(nn.Module):
    """A model returning its logits with a string tag: Torch-Pruning's tracer reads ``grad_fn`` of every output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 8, 3), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3))), "logits"


def test_a_graph_that_cannot_be_built_names_the_library_the_phase_and_what_to_try(images: dict) -> None:
    model = TaggedOutput().eval()
    ctx = make_ctx(model, images, evaluate=lambda m: 0.0)
    with pytest.raises(StageError) as info:
        StructuredPrune(amount=0.3).apply(model, ctx)
    message = str(info.value)
    assert (
        "Torch-Pruning could not build the model's dependency graph (tracing the forward: AttributeError: "
        "'str' object has no attribute 'grad_fn')" in message
    )
    assert "exclude does not take a layer out of it. Try the unstructured methods" in message


def test_one_slow_group_and_then_the_listing_share_interrupt_in_turn() -> None:
    clock = Clock(1.0, logging.getLogger("test"))
    with clock.listing():
        started = time.monotonic()
        with pytest.raises(GroupTimeout, match=r"listing its group took more than 0\.05 s"), clock.one_group(0.05):
            time.sleep(5)
        assert time.monotonic() - started < 1
        with pytest.raises(GraphTimeout, match=r"tracing the dependency graph took more than 70% of time_limit=1 s"):
            time.sleep(5)
        assert time.monotonic() - started < 1.5


def test_a_listing_that_ended_is_not_interrupted_by_its_timer() -> None:
    # efficientformerv2_s0 listed its groups within the share and the timer then fired in the work after the
    # listing, failing the stage with every group listed
    clock = Clock(0.2, logging.getLogger("test"))
    with clock.listing():
        clock.stop()
        time.sleep(0.4)  # past the listing share: nothing fires
    with pytest.raises(GraphTimeout), clock.listing():
        time.sleep(0.4)  # the same without stop()


def test_a_cpu_time_limit_counts_the_work_done_not_the_time_waited() -> None:
    clock = Clock(0.4, logging.getLogger("test"), cpu=True)
    with clock.listing():
        time.sleep(0.6)  # waiting (a busy machine's other work) uses none of this process's CPU time
        clock.check_listing()
        started = time.process_time()
        with pytest.raises(GraphTimeout, match=r"took more than 70% of time_limit=0\.4 s of CPU time"):
            while time.process_time() - started < 5:
                pass
    assert clock.elapsed() < 1.0 and clock.cpu


def test_cuts_stop_at_the_time_limit_and_name_the_groups_not_reached() -> None:
    from torchslim.plugins.prune._structured import _cut_all, _graph_and_groups

    torch.manual_seed(0)
    model, state, opts = DualPath(blocks=2).eval(), ChannelState(), ChannelOptions("layer", 1, 1, 0.9, [])
    graph, groups = _graph_and_groups(model, EXAMPLE, opts, state, Clock(None, logging.getLogger("test")), {})
    for group in groups:
        group.remove = 1
    listed = set(state.skipped)
    undone = _cut_all(model, graph, groups, EXAMPLE, opts, state, Clock(1e-9, logging.getLogger("test")), {})
    late = {name: reason for name, reason in state.skipped.items() if name not in listed}
    assert undone == 0 and len(groups) >= 2 and set(late) == {g.name for g in groups}
    assert all(reason.startswith("not cut: time_limit=1e-09 s ran out after") for reason in late.values())
    assert [conv.out_channels for conv in model.reduce] == [8, 8]


def test_cuts_are_checked_together_and_one_by_one_where_a_batch_breaks(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchslim.plugins.prune import _structured_checks as checks
    from torchslim.plugins.prune._structured import _cut_all, _graph_and_groups

    torch.manual_seed(0)
    model, state, opts = DualPath(blocks=4).eval(), ChannelState(), ChannelOptions("layer", 1, 1, 0.9, [])
    graph, groups = _graph_and_groups(model, EXAMPLE, opts, state, Clock(None, logging.getLogger("test")), {})
    for group in groups:
        group.remove = 1
    broken = model.reduce[3]  # its cut is made, then breaks the forward: undone alone, the batch's others kept
    original = broken.forward
    broken.forward = lambda x: original(x) if broken.out_channels == 8 else x[:, :0]  # type: ignore[method-assign]
    checked: list[int] = []
    together = checks.Batches._together
    monkeypatch.setattr(checks.Batches, "_together", lambda self, batch: checked.append(len(batch)) or together(self, batch))
    with caplog.at_level("INFO"):
        undone = _cut_all(model, graph, groups, EXAMPLE, opts, state, Clock(None, logging.getLogger("test")), {})
    assert undone == 1 and "cut undone" in state.skipped["reduce.3"] and max(checked) >= 2
    assert [conv.out_channels for conv in model.reduce] == [7, 7, 7, 8]
    forwards = int(re.search(r"checked by (\d+) forwards", caplog.text).group(1))  # type: ignore[union-attr]
    assert forwards < len(groups) + max(checked)
    assert model(EXAMPLE).shape == (2, 10)


def test_listing_and_cutting_log_their_progress(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(clock_module, "PROGRESS_SECONDS", 0.0)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="torchslim"):
        prune_step(DualPath(blocks=2).eval(), EXAMPLE, 0.3, ChannelOptions("layer", 1, 1, 0.9, []), ChannelState(), time_limit=60)
    assert re.search(r"structured: listed 1 groups in \d+ s \(at \w+", caplog.text)
    assert re.search(r"structured: cut 1/\d+ groups in \d+ s \(at \w+", caplog.text)


def test_a_second_pass_that_runs_out_of_time_keeps_the_first_pass_cuts(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchslim.plugins.prune import _structured

    passes: list[float | None] = []

    def one_pass(*args: object) -> int:  # the first pass undoes a cut; tracing again runs out of time
        passes.append(args[-1].seconds)  # type: ignore[attr-defined]
        if len(passes) > 1:
            raise GraphTimeout("listing and scoring the groups took more than 70% of time_limit=10 s")
        return 1

    monkeypatch.setattr(_structured, "_prune_pass", one_pass)
    prune_step(nn.Linear(2, 2), EXAMPLE, 0.3, ChannelOptions("global", 1, 1, 0.9, []), ChannelState(), time_limit=10.0)
    assert len(passes) == 2 and passes[1] is not None and passes[1] > 5
    passes.clear()
    monkeypatch.setattr(_structured, "_prune_pass", lambda *args: (_ for _ in ()).throw(GraphTimeout("first")))
    with pytest.raises(GraphTimeout, match="first"):
        prune_step(nn.Linear(2, 2), EXAMPLE, 0.3, ChannelOptions("global", 1, 1, 0.9, []), ChannelState(), time_limit=10.0)
