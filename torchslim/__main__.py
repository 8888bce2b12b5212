"""``python -m torchslim``: the same as the ``torchslim`` command."""

from .engine.cli import main

raise SystemExit(main())
