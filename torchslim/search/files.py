"""What a search writes after every trial: ``front.json``, ``front.md``, ``front.png`` and ``best.yaml``.

Each file is written atomically, so a search killed at any moment leaves the previous trial's files whole.
``front.png`` is the comparison's plot (:mod:`torchslim.compare.plot`) of every trial that ran.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from tabulate import tabulate

from ..compare.budget import Budget
from ..compare.pareto import fronts
from ..compare.plot import PLOT_HINT, plot_png
from ..compare.table import Comparison, Entry, Mode
from ..engine.atomic import write_text, write_with
from ..engine.report import Report, Row, format_figure
from ..engine.yamlio import dump_yaml
from .front import Answer
from .objectives import key, total_miss
from .records import Record, describe_values, unit_orders

FRONT_JSON, FRONT_MD, FRONT_PNG, BEST_YAML = "front.json", "front.md", "front.png", "best.yaml"
FILES = (FRONT_JSON, FRONT_MD, FRONT_PNG, BEST_YAML)
_KINDS = {"metric": "metric", "latency": "ms", "size": "bytes", "packed_size": "bytes", "macs": "count"}
_UNITS = {"latency": " ms"}


def write_files(out: Path, state: SearchState) -> None:
    """Every file of the search so far, each replaced whole."""
    write_text(out / FRONT_JSON, json.dumps(to_json(state), indent=2) + "\n")
    png = plot_png(_comparison(state), "torchslim search") if any(r.ok for r in state.records) else None
    if png is not None:
        _write_bytes(out / FRONT_PNG, png)
    write_text(out / FRONT_MD, to_markdown(state, png is not None))
    best = state.answer.best
    if best is not None and state.best_recipe is not None:
        write_text(out / BEST_YAML, best_yaml(state, best, state.best_recipe))


class SearchState:
    """A search's trials so far, what they are judged by, and the answer."""

    def __init__(
        self,
        records: Sequence[Record],
        answer: Answer,
        objectives: Sequence[str],
        metric: str,
        budget: Budget | None,
        best_recipe: dict[str, Any] | None,
        planned: int | None,
    ) -> None:
        self.records, self.answer, self.objectives, self.metric = list(records), answer, list(objectives), metric
        self.budget, self.best_recipe, self.planned = budget, best_recipe, planned
        """``best_recipe``: the recommended trial's recipe data (no search); ``planned``: the trials budget, if any."""

    def objective_cells(self, record: Record) -> list[str]:
        """The objective figures of a trial, as the tables show them."""
        cells = [format_figure(record.final.get(key(o, self.metric)), _KINDS[o]) for o in self.objectives]  # type: ignore[arg-type]
        return [cell + _UNITS.get(o, "") if cell != "-" else cell for o, cell in zip(self.objectives, cells, strict=True)]

    def miss_words(self, record: Record) -> str:
        """``misses the budget by 40% in all: accuracy drop 1.4 > 1``."""
        return f"misses the budget by {total_miss(record.excess):.0%} in all: {'; '.join(record.misses)}"


def to_json(state: SearchState) -> dict[str, Any]:
    """front.json: the front, the recommended trial and every trial."""
    best = state.answer.best
    return {
        "metric": state.metric,
        "objectives": state.objectives,
        "constraints": state.budget.given() if state.budget else None,
        "trials_done": len(state.records),
        "trials_planned": state.planned,
        "front": [r.number for r in state.answer.front],
        "front_meets_constraints": state.answer.meets,
        "best": None
        if best is None
        else {
            "trial": best.number,
            "folder": best.folder,
            "values": best.values,
            "meets_constraints": state.answer.meets,
            "misses": best.misses,
            "total_miss": total_miss(best.excess),
            "recipe": BEST_YAML,
        },
        "trials": [_trial_json(r, state) for r in state.records],
    }


def _trial_json(record: Record, state: SearchState) -> dict[str, Any]:
    data = {
        "trial": record.number,
        "values": record.values,
        "folder": f"trials/{record.folder}",
        "seconds": round(record.seconds, 3),
    }
    if record.rungs:  # search.cheap: the objectives of each cheap run, cheapest first
        data["rungs"] = [dict(zip(state.objectives, r["objectives"], strict=False)) for r in record.rungs]
    if record.error is not None:
        return {**data, "error": record.error}
    data = {
        **data,
        "objectives": dict(zip(state.objectives, record.objectives, strict=True)),
        "final": record.final,
        "baseline": record.baseline,
        "misses": record.misses,
    }
    if record.stopped is not None:  # its figures are the cheap rung's: never on the front
        return {**data, "stopped_after_rung": record.stopped}
    return {**data, "on_front": record in state.answer.front}


def to_markdown(state: SearchState, plotted: bool) -> str:
    """front.md: the front as a table, the recommended trial, the plot."""
    plot = (
        f"![{state.metric} against size and latency]({FRONT_PNG})"
        if plotted
        else f"no plot: matplotlib is not installed; {PLOT_HINT} for {FRONT_PNG}"
    )
    lines = "".join(f"- {line}\n" for line in summary_lines(state))
    return f"# torchslim search: the Pareto front\n\n{front_table(state, 'github')}\n\n{lines}\n{plot}\n"


def front_table(state: SearchState, fmt: str = "simple") -> str:
    """The front: one line per trial on it, with its values and objectives (and whether it meets the budget)."""
    headers = [
        "trial",
        "values",
        *(state.metric if o == "metric" else o for o in state.objectives),
        *(["budget"] if state.budget else []),
    ]
    rows = [
        [
            str(r.number),
            describe_values(r.values, short=True),
            *state.objective_cells(r),
            *(["pass" if not r.misses else "fail"] if state.budget else []),
        ]
        for r in state.answer.front
    ]
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


def summary_lines(state: SearchState) -> list[str]:
    """What the front is of, the recommended trial, and the failed trials."""
    which = "meet the constraints" if state.answer.meets else "ran (none meets the constraints)"
    lines = [
        f"{len(state.records)} trial(s) done; the front of those that {which}, over {', '.join(state.objectives)}: "
        f"{len(state.answer.front)} trial(s)"
    ]
    best = state.answer.best
    if best is not None:
        verdict = (
            f"the best {state.metric} on the front that meets the constraints" if state.answer.meets else state.miss_words(best)
        )
        lines.append(f"{BEST_YAML}: trial {best.number} ({describe_values(best.values)}): {verdict}")
    lines += [f"failed: trial {r.number} ({describe_values(r.values)}): {r.error}" for r in state.records if r.error]
    for path, units in unit_orders(state.answer.front).items():
        lines.append(f"{path} in the table: the settings of {', '.join(units)}, in that order")
    stopped = [str(r.number) for r in state.records if r.stopped is not None]
    if stopped:
        lines.append(f"stopped after a cheap run (search.cheap), not promising enough: trial(s) {', '.join(stopped)}")
    return lines


def best_yaml(state: SearchState, best: Record, recipe: dict[str, Any]) -> str:
    """A plain recipe (no search) that ``torchslim run`` reproduces: the recommended trial's."""
    data = dict(recipe)
    if state.answer.meets:
        head = f"# torchslim search: trial {best.number}, the best {state.metric} on the front that meets the constraints"
    else:
        head = f"# torchslim search: no trial meets the constraints; trial {best.number} is the closest: {state.miss_words(best)}"
        data["name"] = f"{data.get('name', 'recipe')}-closest"
    values = f"# values: {describe_values(best.values)}\n# its report: trials/{best.folder}\n"
    return f"{head}\n{values}{dump_yaml(data)}"


def _comparison(state: SearchState) -> Comparison:
    """The trials that ran as a comparison, for its plot: one entry per trial, the fronts of metric vs size and latency."""
    ran = [r for r in state.records if r.ok]
    keys = list(dict.fromkeys(json.dumps(r.baseline, sort_keys=True) for r in ran))
    baselines = [Row("baseline", None, json.loads(k)) for k in keys]
    entries = [
        Entry(
            f"trial {r.number}: {describe_values(r.values, short=True)}",
            r.folder,
            "search",
            r.values,
            keys.index(json.dumps(r.baseline, sort_keys=True)),
            report=Report({}, state.metric, [Row("baseline", None, r.baseline), Row("final", "search", r.final)]),
            failures=r.misses if state.budget else None,
        )
        for r in ran
    ]
    for entry, marks in zip(entries, fronts([e.final for e in entries], state.metric, [r.baseline for r in ran]), strict=True):
        entry.fronts = marks
    groups = [[e.name for e in entries if e.group == g] for g in range(len(keys))]
    return Comparison(state.metric, entries, baselines, groups, Mode(1, os.cpu_count() or 1, None), constraints=state.budget)


def _write_bytes(path: Path, data: bytes) -> None:
    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    write_with(path, write)
