"""Installing a package folder with pip, the way a user would, but into a throwaway folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def install_into(source: Path, target: Path) -> None:
    """``pip install SOURCE --target TARGET``: offline, without dependencies, with this venv's hatchling."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip could not install {source}:\n{result.stdout}{result.stderr}")
