"""torchslim's version, read from the installed distribution's metadata (no import of the package root)."""

from __future__ import annotations

from importlib import metadata


def _installed() -> str:
    try:
        return metadata.version("torchslim")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _installed()
