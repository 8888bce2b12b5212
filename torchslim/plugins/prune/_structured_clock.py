"""Structured pruning's time limit, kept through every slow phase of a step.

A step (one trace, listing, scoring and cut; again where cuts were undone) gets ``time_limit`` seconds:

- **tracing, listing and scoring** may take up to :data:`LISTING` of it. Torch-Pruning's loops are
  interrupted by a timer signal: past that share, tracing that has not finished fails the stage
  (:class:`GraphTimeout`); listing stops, and the groups listed so far are pruned (the others left whole).
- **one group** may take up to :data:`ONE_GROUP` of it to list: Torch-Pruning can spend minutes mapping a
  channel through reshapes to many indices; such a group is left whole (:class:`GroupTimeout`). A group
  that takes more than a quarter of that is put off until the quick ones are listed.
- **cutting** (each group's cut and the forward that checks it) runs until the whole limit and is checked
  between groups: the groups not reached are left whole.

The limit counts wall seconds, or (``cpu``) the CPU seconds of the whole process, all its threads together:
a limit that a busy machine does not shorten (a benchmark's, run beside other work), through the
profiling timer (``SIGPROF``) instead of the real-time one.

Only the main thread of a system with timer signals can be interrupted; elsewhere the limit is kept only
between groups (a warning says so).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LISTING = 0.7
"""Share of the time limit for tracing, listing and scoring; the rest is left for cutting."""
ONE_GROUP = 0.1
"""Share of the time limit that listing one group may take."""
PROGRESS_SECONDS = 10.0
"""Seconds between progress lines of the listing and the cutting."""


class GraphTimeout(BaseException):
    """Tracing (or listing and scoring) took longer than its share of the time limit.

    An interrupt, raised from a signal handler anywhere in Torch-Pruning's code: a BaseException (as
    KeyboardInterrupt is) so that no ``except Exception`` on its way, the library's or torchslim's own
    "leave this group whole" handlers, swallows it."""


class GroupTimeout(BaseException):
    """Listing one group took longer than :data:`ONE_GROUP` of the time limit (an interrupt, as above)."""


class Clock:
    """One step's time limit (None: no limit), in wall seconds or (``cpu``) the process's CPU seconds."""

    def __init__(self, seconds: float | None, log: logging.Logger, cpu: bool = False) -> None:
        self.seconds, self.log, self.cpu = seconds, log, cpu
        self._now = time.process_time if cpu else time.monotonic
        self._timer, self._signal = (signal.ITIMER_PROF, signal.SIGPROF) if cpu else (signal.ITIMER_REAL, signal.SIGALRM)
        self.start = self._now()
        self._group_end: float | None = None
        self._group_share = ONE_GROUP
        self._armed = False
        self.phase = "tracing the dependency graph"
        """What runs now, named when the listing share runs out."""

    def elapsed(self) -> float:
        """Seconds (CPU seconds with ``cpu``) since the step started."""
        return self._now() - self.start

    def again(self, seconds: float | None) -> Clock:
        """A clock of the same kind for a step given ``seconds`` (what this one left)."""
        return Clock(seconds, self.log, self.cpu)

    def left(self) -> float | None:
        """Seconds left of the whole limit (None: no limit)."""
        return None if self.seconds is None else self.seconds - self.elapsed()

    def cutting_over(self) -> bool:
        """Whether the whole limit has passed (checked between cuts)."""
        left = self.left()
        return left is not None and left <= 0

    def check_listing(self) -> None:
        """:class:`GraphTimeout` if the listing share has passed (between groups, where no timer interrupts)."""
        if self.seconds is not None and self._now() >= self._listing_end():
            raise self._timeout()

    @contextmanager
    def listing(self) -> Iterator[None]:
        """Interrupt what runs inside with :class:`GraphTimeout` once the listing share has passed."""
        if self.seconds is None or not self._can_interrupt():
            yield
            return
        previous = signal.signal(self._signal, self._expire)
        self._armed = True
        self._arm()
        try:
            yield
        finally:
            self._armed = False
            signal.setitimer(self._timer, 0)
            signal.signal(self._signal, previous)

    def stop(self) -> None:
        """Disarm :meth:`listing`'s timer early: the listing is over, and what it listed stands (a timer firing in
        the work after it would throw that away)."""
        if self._armed:
            self._armed = False
            signal.setitimer(self._timer, 0)

    @contextmanager
    def one_group(self, share: float = ONE_GROUP) -> Iterator[None]:
        """Interrupt listing one group with :class:`GroupTimeout` once ``share`` of the limit has passed."""
        if not self._armed or self.seconds is None:
            yield
            return
        self._group_share = share
        self._group_end = self._now() + share * self.seconds
        self._arm()
        try:
            yield
        finally:
            self._group_end = None
            self._arm()

    def _listing_end(self) -> float:
        assert self.seconds is not None  # only armed with a limit
        return self.start + LISTING * self.seconds

    def _arm(self) -> None:
        end = min(self._listing_end(), self._group_end or self._listing_end())
        # a timer of 0 would disarm: an end already passed fires at once
        signal.setitimer(self._timer, max(end - self._now(), 1e-6))

    def _expire(self, signum: int, frame: Any) -> None:
        if self._group_end is not None and self._now() < self._listing_end():
            self._group_end = None
            raise GroupTimeout(f"listing its group took more than {self._group_share * (self.seconds or 0):.3g} s")
        raise self._timeout()

    def _timeout(self) -> GraphTimeout:
        return GraphTimeout(f"{self.phase} took more than {LISTING:.0%} of time_limit={self.seconds:g} s{self.kind}")

    @property
    def kind(self) -> str:
        """How the limit is counted, as the messages add it: nothing for wall seconds."""
        return " of CPU time" if self.cpu else ""

    def _can_interrupt(self) -> bool:
        unable = (
            "no timer signal on this system"
            if not hasattr(signal, "setitimer")
            else "not in the main thread"
            if threading.current_thread() is not threading.main_thread()
            else None
        )
        if unable:
            self.log.warning(
                "  structured: time_limit=%g s cannot interrupt Torch-Pruning here (%s): it is checked between groups only",
                self.seconds,
                unable,
            )
        return unable is None


class Progress:
    """A progress line every :data:`PROGRESS_SECONDS` of a long loop (listing groups, cutting them)."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log, self.what = log, what
        self.start = self.last = time.monotonic()

    def tick(self, done: int, total: int | None, where: str) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        count = f"{done}/{total}" if total is not None else str(done)
        self.log.info("  structured: %s %s groups in %.0f s (at %s)", self.what, count, now - self.start, where)
