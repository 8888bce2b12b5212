"""Comparative studies: several recipes (and sweeps of them) run and measured side by side.

``compare`` expands each recipe's sweep into variants, runs them against shared baselines,
and judges them: Pareto fronts of the metric against size and latency, the budget the recipes
give, the best passing variant. The engine (:mod:`torchslim.engine`) runs one recipe and never
imports this package; this package builds on it.

In the order a comparison walks them:

- :mod:`.study`: the orchestration (:func:`compare`): plan, baselines, variants, judge, write
- :mod:`.plan`: sources -> validated variants (with :mod:`.sweep`: sweep expansion), the output folder made safe
- :mod:`.finished`: reuse of finished variants, and which variants share a baseline
- :mod:`.runtimes`: the float32 baseline in each runtime a variant is deployed to
- :mod:`.jobs`: running variants here or in parallel processes
- :mod:`.budget`: the comparison's one budget and the checks against it
- :mod:`.pareto`: Pareto fronts and the best variant
- :mod:`.table`: the result (entries, mode, the comparison), its table and summary lines
- :mod:`.export`, :mod:`.plot`: the files (JSON, CSV, Markdown, HTML, PNG)
"""

from __future__ import annotations

from .study import compare

__all__ = ["compare"]
