"""A search logged to MLflow (``--track``): a parent run holding one run per trial, and the search's files."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.tracking import check_tracking, open_tracker
from .files import FILES
from .plan import TRIALS_DIR
from .records import Record


class SearchTracker:
    """The parent run of one search process; each trial it finishes becomes a run under it."""

    def __init__(self, spec: str, out: Path, storage: str | None) -> None:
        self.out = out
        self.tracker = open_tracker(spec, out)
        tags = {"torchslim.command": "search", "torchslim.storage": storage or str(out / "study.journal")}
        self.parent = self.tracker.start(out.name, tags=tags)

    @staticmethod
    def check(spec: str) -> None:
        """UsageError for a tracker other than MLflow, or MLflow missing: before the first trial."""
        check_tracking(spec)

    def trial(self, record: Record) -> None:
        """Log a finished trial: its report (when it ran) and sampled values; failed with its error."""
        tags = {"torchslim.trial": str(record.number), "torchslim.values": json.dumps(record.values, default=str)[:5000]}
        folder = self.out / TRIALS_DIR / record.folder
        self.tracker.log_run(
            f"trial {record.number}", folder if folder.is_dir() else None, parent=self.parent, error=record.error, tags=tags
        )

    def close(self, failed: bool = False) -> str:
        """Log the search's files (front, plot, best.yaml) and end its run; the store's URI."""
        self.tracker.log_files(self.parent, (self.out / f for f in FILES))
        self.tracker.end(self.parent, failed)
        return self.tracker.uri
