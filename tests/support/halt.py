"""Run a recipe whose last stage kills the process, like a machine dying mid-run.

usage: python -m tests.support.halt RECIPE OUT_DIR

The ``halt`` stage is a real Stage registered next to the built-ins; it sends SIGKILL to its
own process, so nothing after it runs and no Python cleanup happens.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Literal

from torch import nn

import torchslim
from torchslim import Context, Registry, Stage, StageEntry


class HaltStage(Stage):
    """Kill the running process at once."""

    type: Literal["halt"] = "halt"

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Never returns."""
        os.kill(os.getpid(), signal.SIGKILL)
        return model


def main() -> None:
    """Run the recipe given on the command line with the halt stage available."""
    registry = Registry.load(autoload=False)
    registry.add(StageEntry("halt", "tests", "tests.support.halt:HaltStage", cls=HaltStage))
    torchslim.run(sys.argv[1], sys.argv[2], registry=registry)


if __name__ == "__main__":
    main()
