"""The calibration inputs are read from the user's loader once per run and shared by the stages that need them."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from torchslim.examples import digits
from torchslim.plugins.prune import WandaPrune
from torchslim.plugins.quantize import StaticQuantize

from .conftest import make_ctx


class CountingLoader:
    """A real loader's batches, counting how many were pulled out of it."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.pulled = batches, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.pulled += 1
            yield batch


def test_stages_share_one_read_of_the_calibration_data() -> None:
    data: dict[str, Any] = dict(digits.loaders(batch_size=32))
    calibration = CountingLoader(list(data["calibration"]))
    data["calibration"] = calibration
    model = digits.mlp(hidden=32, train_epochs=2)
    ctx = make_ctx(model, data)
    pruned = WandaPrune(amount=0.5, calibration_batches=6).apply(copy.deepcopy(model), ctx.for_stage())
    assert calibration.pulled == 6
    StaticQuantize(calibration_batches=4).apply(copy.deepcopy(pruned), ctx.for_stage())
    assert calibration.pulled == 6  # a later stage asking for as many or fewer reads nothing
    StaticQuantize(calibration_batches=8).apply(pruned, ctx.for_stage())
    # One asking for more reads the loader again from its start (a shuffling loader's next pass starts
    # elsewhere: the first batches must come from one pass), once.
    assert calibration.pulled == 6 + 8
