"""``python -m torchslim``: the same as the ``torchslim`` command."""

from .cli import main

raise SystemExit(main())
