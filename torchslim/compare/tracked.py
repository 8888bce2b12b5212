"""A comparison logged to MLflow (``--track``): a parent run with the comparison's files, one run per variant."""

from __future__ import annotations

from ..engine.tracking import open_tracker
from .export import EXPORT_FILES
from .table import Comparison


def log_comparison(spec: str, comparison: Comparison, name: str) -> str:
    """Log ``comparison`` to the tracker ``spec`` (``mlflow[:URI]``) as run ``name`` with a run per variant; its URI."""
    out = comparison.out
    tracker = open_tracker(spec, out)
    parent = tracker.start(name, tags={"torchslim.command": "compare", "torchslim.mode": comparison.mode.describe()})
    for entry in comparison.entries:
        folder = out / entry.folder if out is not None else None
        tracker.log_run(entry.name, folder, entry.report, parent, entry.error, {"torchslim.reused": str(entry.reused)})
    if out is not None:
        tracker.log_files(parent, (out / f for f in EXPORT_FILES))
    tracker.end(parent, failed=any(e.error for e in comparison.entries))
    return tracker.uri
