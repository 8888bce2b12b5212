"""The output directory of a run: what may be written there, and the failure log."""

from __future__ import annotations

import traceback
from pathlib import Path

from .atomic import write_text
from .checkpoints import CHECKPOINT_DIR
from .errors import OutputError, TorchslimError, plain_text
from .report import REPORT_FILES
from .saving import DEPLOY_FILES, DEPLOY_INFO, MODEL_FILE, RECIPE_FILE

FAILURE_LOG = "torchslim.log"
#: Every file and folder a run writes; --overwrite replaces these and nothing else.
OUTPUT_FILES = (*REPORT_FILES, RECIPE_FILE, MODEL_FILE, *DEPLOY_FILES, DEPLOY_INFO, CHECKPOINT_DIR, FAILURE_LOG)


def prepare_output(out_dir: Path, reuse: bool, create: bool = True) -> Path:
    """Check ``out_dir`` can take the outputs without destroying anything the user had.

    A non-empty directory is used only with ``reuse`` (``--overwrite`` or ``--resume``), and then
    only torchslim's own files in it are replaced.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not reuse:
        # Said in Python's words (torchslim.run's keywords); the CLI says its flags instead.
        raise OutputError(
            f"{out_dir}: directory is not empty; choose another out directory, pass resume=True to "
            f"continue a run there, or overwrite=True (which replaces only {', '.join(OUTPUT_FILES)})"
        )
    if create:
        out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def record_failure(out_dir: Path, exc: BaseException) -> None:
    """Write the traceback of ``exc`` to the failure log and point the error at it."""
    path = out_dir / FAILURE_LOG
    # A library's message may colour a phrase (torch's weights_only refusal does): the log is a plain file.
    text = plain_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    write_text(path, text)
    if isinstance(exc, TorchslimError):
        exc.log_path = path


def clear_failure(out_dir: Path) -> None:
    """Remove a failure log left by an earlier attempt: this run finished (a resumed one included)."""
    (out_dir / FAILURE_LOG).unlink(missing_ok=True)
