"""Structured pruning's cuts checked together: several groups cut, then one forward checks them all.

Where that forward breaks (or its output shapes change), the batch is undone and its groups are cut again
one at a time, each checked alone (``_structured_cut._cut``): the model and the groups left whole are what
checking every cut alone gives, for a fraction of the forwards. A batch doubles while its checks pass (1, 2,
4, ... up to :data:`MOST` cuts) and is back to one cut after one breaks: a network whose cuts all pass (most
convolutional networks) pays about one forward per :data:`MOST` cuts, one whose cuts often break little more
than one forward per cut. On a large input the forward is most of a cut's time (Inception at 299x299).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from ._structured_cut import _cut, commit, make, planned, save, undo

if TYPE_CHECKING:
    from ._structured import ChannelState, _Group
    from ._structured_data import Lost

MOST = 16
"""The most cuts one forward checks."""


class Batches:
    """Groups cut in batches, each checked by one forward of the model (shapes of its outputs)."""

    def __init__(
        self,
        model: nn.Module,
        graph: Any,
        forward: Callable[[], Any],
        expected: Any,
        state: ChannelState,
        lost: dict[nn.Module, Lost],
    ) -> None:
        self.model, self.graph, self.forward, self.expected = model, graph, forward, expected
        self.state, self.lost = state, lost
        self.size = 1
        self.waiting: list[_Group] = []
        self.forwards = 0
        """Forwards run to check cuts (batches and single cuts)."""

    def add(self, group: _Group) -> None:
        """Cut ``group`` with the next batch (now, when the batch is full)."""
        self.waiting.append(group)
        if len(self.waiting) >= self.size:
            self.flush()

    def flush(self) -> None:
        """Cut and check the groups waiting."""
        groups, self.waiting = self.waiting, []
        if len(groups) > 1 and self._together(groups):
            self.size = min(2 * self.size, MOST)
            return
        broke = False
        for group in groups:
            self.forwards += group.remove > 0
            broke |= _cut(self.model, self.graph, group, self.forward, self.expected, self.state, self.lost)
        self.size = 1 if broke or len(groups) > 1 else min(2 * self.size, MOST)

    def _together(self, groups: list[_Group]) -> bool:
        """Cut ``groups`` and check them with one forward; undone (False) where it breaks."""
        saved, skipped, removes = save(self.model, self.graph), dict(self.state.skipped), [g.remove for g in groups]
        made = []
        try:
            for group in groups:
                pending = planned(self.graph, group, self.state)
                if pending is not None:
                    make(self.model, self.graph, pending)
                    made.append(pending)
            if made:
                self.forwards += 1
                got = self.forward()
                if got != self.expected:
                    raise RuntimeError(f"output shape changed from {self.expected} to {got}")
        except Exception:
            undo(self.model, saved)
            self.state.skipped.clear()
            self.state.skipped.update(skipped)  # what this batch named is named again, one cut at a time
            for group, remove in zip(groups, removes, strict=True):
                group.remove = remove
            return False
        for pending in made:
            commit(pending, self.state, self.lost)
        return True
