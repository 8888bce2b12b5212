"""``torchslim search``: a budgeted multi-objective search over a recipe's values, measured as ``compare`` measures.

A recipe's ``search:`` block names the space (dotted paths into the recipe, each a range or a list of choices),
the objectives and the budget; Optuna samples each trial's values, and each trial is a recipe variant run
through :func:`torchslim.compare.jobs.execute` with one shared baseline. The study is kept in a journal file in
the output folder, so a killed search resumes without repeating finished trials. This package imports the
engine and ``compare``; neither imports it. Optuna is an optional extra (``pip install 'torchslim[search]'``),
imported by :mod:`.study` alone.

In the order a search walks them:

- :mod:`.loop`: the orchestration (:func:`search`): plan, then batches of trials (one, or ``--jobs``) until the
  budget is spent
- :mod:`.plan`: the recipe read and checked (space, measured figures), the output folder made safe
- :mod:`.trial`: one trial before its run (sampled, validated, its baseline) and after it (objectives, misses)
- :mod:`.halving`: ``search.cheap``: cheap rungs first, Optuna's successive halving on each trial's rank
- :mod:`.space`: sampling a trial's values, setting them into the recipe, checking the space
- :mod:`.study`: the Optuna study in its journal file: samplers, resume, ask and tell
- :mod:`.objectives`: objectives and constraint misses from a trial's final row
- :mod:`.records`: one finished trial as plain data, stored with its Optuna trial
- :mod:`.front`: the Pareto front and the recommended trial
- :mod:`.files`: front.json, front.md, front.png and best.yaml
"""

from __future__ import annotations

from .loop import SearchResult, search

__all__ = ["SearchResult", "search"]
