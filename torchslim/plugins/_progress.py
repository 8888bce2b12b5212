"""Training progress: one line redrawn in place on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import SupportsFloat, TextIO

#: Seconds between redraws of the live line: often enough to look alive, rarely enough to cost nothing.
REDRAW_EVERY = 0.2
BAR_WIDTH = 20


class Progress:
    """Reports a training loop's loss and eval metric.

    Live (one line rewritten with ``\\r``) when ``stream`` is a terminal and the logger shows
    INFO; otherwise one ``log.info`` line per epoch. Silent when ``enabled`` is False (the
    processes other than rank 0 under torchrun).
    """

    def __init__(self, label: str, log: logging.Logger, metric: str, total_steps: int | None,
                 enabled: bool = True, stream: TextIO | None = None) -> None:
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

    def epoch(self, epoch: int, epochs: int, loss: float, score: float, best: float) -> None:
        """After each epoch's evaluation."""
        if not self.enabled:
            return
        self.score_text = f", {self.metric} {score:.2f} (best {best:.2f})"
        if self.live:
            self._draw(f"epoch {epoch}/{epochs} loss {loss:.4f}{self.score_text}")
        else:
            self.log.info("  %s epoch %d/%d: loss %.4f, %s %.2f (best %.2f)",
                          self.label, epoch, epochs, loss, self.metric, score, best)

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
