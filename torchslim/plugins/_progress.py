"""Training progress epoch by epoch: what is shown (one line redrawn in place on a terminal, plain
log lines otherwise), and what is kept (the best epoch's weights, early stopping)."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, SupportsFloat, TextIO

import torch
from torch import nn

#: Seconds between redraws of the live line: often enough to look alive, rarely enough to cost nothing.
REDRAW_EVERY = 0.2
BAR_WIDTH = 20
#: Mean loss and mean feature-distillation part of one epoch.
EpochLoss = tuple[float, float]


class Progress:
    """Reports a training loop's loss and eval metric.

    Live (one line rewritten with ``\\r``) when ``stream`` is a terminal and the logger shows
    INFO; otherwise one ``log.info`` line per epoch. Silent when ``enabled`` is False (the
    processes other than rank 0 under torchrun).
    """

    def __init__(
        self,
        label: str,
        log: logging.Logger,
        metric: str,
        total_steps: int | None,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.label, self.log, self.metric, self.total = label, log, metric, total_steps
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and log.isEnabledFor(logging.INFO)
        self.live = self.enabled and _is_terminal(self.stream)
        self.last_draw = 0.0
        self.score_text = ""

    def step(self, epoch: int, epochs: int, steps: int, loss: SupportsFloat) -> None:
        """After each optimizer step: redraw the live line (at most every REDRAW_EVERY seconds)."""
        now = time.monotonic()
        if not self.live or now - self.last_draw < REDRAW_EVERY:
            return
        self.last_draw = now
        self._draw(f"epoch {epoch}/{epochs} {self._bar(steps)} loss {float(loss):.4f}{self.score_text}")

    def epoch(self, epoch: int, epochs: int, loss: float, score: float | None, best: float) -> None:
        """After each epoch (and its evaluation: ``score`` None when the run does not evaluate)."""
        if not self.enabled:
            return
        if score is not None:
            self.score_text = f", {self.metric} {score:.2f} (best {best:.2f})"
        if self.live:
            self._draw(f"epoch {epoch}/{epochs} loss {loss:.4f}{self.score_text}")
        else:
            self.log.info("  %s epoch %d/%d: loss %.4f%s", self.label, epoch, epochs, loss, self.score_text)

    def close(self) -> None:
        """End the live line, so the next log line starts on its own."""
        if self.live and self.last_draw:
            self.stream.write("\n")
            self.stream.flush()

    def _bar(self, steps: int) -> str:
        if not self.total:
            return f"step {steps}"
        done = min(BAR_WIDTH, BAR_WIDTH * steps // self.total)
        return f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] {steps}/{self.total}"

    def _draw(self, text: str) -> None:
        self.last_draw = self.last_draw or time.monotonic()
        # \x1b[K clears what a longer previous line left on the right.
        self.stream.write(f"\r{self.label}: {text}\x1b[K")
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or unusual streams
        return False


@dataclass
class Keeper:
    """Tracks the eval score epoch by epoch: the best weights (``keep: best``) and early stopping.

    The model as training received it is epoch 0 (:meth:`start`): a candidate like any epoch, so
    ``keep: best`` never returns weights that score worse than those it was given.
    """

    keep: Literal["best", "last"]
    higher: bool
    patience: int | None
    best: float = math.nan
    best_epoch: int = 0
    losses: dict[int, EpochLoss] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    start_score: float = math.nan
    """The score of the model before training (NaN: not evaluated)."""
    last_score: float = math.nan
    """The score of the last epoch run."""

    def start(self, score: float, model: nn.Module) -> None:
        """Record the untrained model's score as epoch 0 (no train loss: it was not trained)."""
        self.start_score = self.last_score = score
        self.update(0, (math.nan, math.nan), score, model)
        self.stale = 0  # patience counts trained epochs only

    def update(self, epoch: int, loss: EpochLoss, score: float, model: nn.Module) -> None:
        """Record one epoch's loss and score; snapshot the weights if the score is the best yet."""
        self.losses[epoch] = loss
        self.last_score = score
        if not self._improves(score):
            self.stale += 1
            return
        self.best, self.best_epoch, self.stale = score, epoch, 0
        if self.keep == "best":
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _improves(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if math.isnan(self.best):
            return True
        return self.beats(score, self.best)

    def beats(self, score: float, other: float) -> bool:
        """Whether ``score`` is strictly better than ``other`` (False if either is NaN)."""
        return score > other if self.higher else score < other

    @property
    def stop(self) -> bool:
        """Whether ``patience`` epochs passed without a better score."""
        return self.patience is not None and self.stale >= self.patience

    def finish(self, model: nn.Module, last_epoch: int) -> EpochLoss:
        """Load the kept weights into ``model``; return the train losses of the kept epoch."""
        if self.keep == "best" and self.state is not None:
            model.load_state_dict(self.state)
            return self.losses[self.best_epoch]
        return self.losses[last_epoch]
