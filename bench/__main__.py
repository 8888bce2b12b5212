"""``python -m bench [--quick] [--case NAME]``: see :mod:`bench.run`."""

from bench.run import main

raise SystemExit(main())
