"""The wide zoo (``python -m bench.zoo --wide``): every timm family's smallest variant and the hand-written
models, resumably, with the failures sorted into kinds.

The models are the family list (bench/zoo_families.py, committed as bench/results/zoo-wide-models.json)
and bench/zoo_handwritten.py's. Each model runs as in the named zoo (bench/zoo.py: its own subprocess, a
time limit per recipe); each result is appended as one JSON line to the results file as soon as its model
is done, so an interrupted run loses at most the model it was on, and a rerun skips every model+recipe
already there (checked again before each model, so two runs on the same file, say each given half of the
models with ``--models``, share it). The summary counts what finished and sorts every failure into a kind (:func:`kind`).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "zoo-wide.jsonl"

PRUNING = ("structured", "obs-refit", "struct+static", "tp-alone")
GOOD_MACS = 1.4
DOES_NOT_BUILD = "does not build"
#: Where a model's own forward runs (PyTorch's layers, timm's and the hand-written models' code): a failure
#: raised there, outside a measurement, is the compressed model breaking on data it had not been checked on.
MODEL_CODE = ("torch/nn/", "timm/", "bench/zoo_handwritten.py")


def load_average() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "?"


def models() -> list[str]:
    """The wide zoo's models, in order: the hand-written ones, then each family's chosen variant, smallest
    first (so that an interrupted run has done the most models, and leaves the slowest)."""
    from bench import zoo_families, zoo_handwritten

    built = sorted((f for f in zoo_families.load() if f.get("model")), key=lambda f: (f["params"] or 0) * f["size"] ** 2)
    return list(zoo_handwritten.MODELS) + [f["model"] for f in built]


def not_built(keys: list[str]) -> list[dict[str, Any]]:
    """One failed result per recipe for each family none of whose variants built: listed, not dropped."""
    from bench import zoo_families

    return [
        {"model": f"({f['family']})", "recipe": key, "ok": False, "error": f["reason"], "kind": DOES_NOT_BUILD}
        for f in zoo_families.load()
        if not f.get("model")
        for key in keys
    ]


def read(path: Path) -> list[dict[str, Any]]:
    """The results appended so far (the last line of a model+recipe wins)."""
    if not path.exists():
        return []
    found = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            found[(row["model"], row["recipe"])] = row
    return list(found.values())


def kind(result: dict[str, Any]) -> str | None:
    """The failure kind of one result, or None if it is a success (a pruning recipe must also reach
    1.4x fewer MACs)."""
    if result["ok"]:
        short = result["recipe"] in PRUNING and (result.get("macs") or 0) < GOOD_MACS
        return f"< {GOOD_MACS}x MACs" if short else None
    error = str(result["error"])
    checks = [
        (result.get("kind") == DOES_NOT_BUILD, DOES_NOT_BUILD),
        (error.startswith("timeout"), "timeout"),
        ("subprocess died" in error, "subprocess died"),
        ("time_limit=" in error, "graph time_limit"),
        (bool(result.get("graph_builder")), "graph-builder crash"),
        ("no channel could be removed" in error, "nothing pruned"),
        ("matched no layer" in error, "refused: no layer of the kind the stage quantizes"),
        ("failed too" in error and "eager" in error, "int8 FX+eager failure"),
        ("loads again" in error or "rebuilt from its checkpoint" in error, "reload failure"),
        ("fails in the measurement after the stage" in error, "forward check failure"),
        (str(result.get("where", "")).startswith(MODEL_CODE), "pruned model's forward broke"),
        (str(result.get("where", "")).startswith("torch_pruning/"), "Torch-Pruning crash (scoring or cutting)"),
    ]
    return next((name for hit, name in checks if hit), "other error")


def summary(results: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Counts per recipe, failure kinds per recipe, and every failure's first line."""
    per_recipe = {}
    kinds: dict[str, Counter[str]] = {}
    for key in keys:
        rows = [r for r in results if r["recipe"] == key]
        finished = [r for r in rows if r["ok"]]
        per_recipe[key] = {
            "models": len(rows),
            "finished": len(finished),
            "macs_ok": sum(1 for r in finished if (r.get("macs") or 0) >= GOOD_MACS),
        }
        kinds[key] = Counter(k for r in rows if (k := kind(r)))
    failures = [
        {
            "model": r["model"],
            "recipe": r["recipe"],
            "kind": kind(r),
            "error": r.get("error") or _short_of(r),
            "where": r.get("where"),
        }
        for r in results
        if r["recipe"] in keys and kind(r)
    ]
    return {"recipes": per_recipe, "kinds": {k: dict(v) for k, v in kinds.items()}, "failures": failures}


def _short_of(result: dict[str, Any]) -> str:
    """What a finished pruning recipe that removed too little says: its MACs ratio and its stage's note."""
    notes = result.get("notes") or []
    return f"{result.get('macs') or 0:.2f}x MACs" + (f"; {notes[0]}" if notes else "")


def render(report: dict[str, Any], keys: list[str]) -> str:
    """The summary as Markdown: counts, failure kinds per recipe, every failure."""
    lines = ["| recipe | models | finished | >= 1.4x fewer MACs |", "|---|---|---|---|"]
    for key in keys:
        row = report["recipes"][key]
        macs = str(row["macs_ok"]) if key in PRUNING else "-"
        lines.append(f"| {key} | {row['models']} | {row['finished']} | {macs} |")
    every = sorted({k for key in keys for k in report["kinds"][key]})
    lines += ["", "| failure kind | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {k} | " + " | ".join(str(report["kinds"][key].get(k, 0)) for key in keys) + " |" for k in every]
    lines += ["", "| model | recipe | kind | first line |", "|---|---|---|---|"]
    lines += [f"| {f['model']} | {f['recipe']} | {f['kind']} | {_cell(f['error'])} |" for f in report["failures"]]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:300]


def _done(path: Path, retry: list[str]) -> set[tuple[str, str]]:
    """The model+recipe pairs in ``path``, but those whose failure kind is in ``retry`` (to run again)."""
    return {(r["model"], r["recipe"]) for r in read(path) if kind(r) not in retry}


def run(keys: list[str], timeout: float, path: Path, only: list[str] | None, retry: list[str]) -> list[dict[str, Any]]:
    """Run every wide-zoo model+recipe not yet in ``path`` (or there with a failure kind in ``retry``),
    appending each model's results as it finishes."""
    from bench.zoo import cell, run_model

    done = _done(path, retry)
    names = [n for n in models() if not only or n in only]
    todo = [(n, [k for k in keys if (n, k) not in done]) for n in names]
    todo = [(n, left) for n, left in todo if left]
    print(
        f"wide zoo: {len(names)} models, {len(names) - len(todo)} already done in {path}, {len(todo)} to run "
        f"(timeout {timeout:.0f} s per recipe); load average {load_average()}",
        file=sys.stderr,
        flush=True,
    )
    began = time.time()
    for index, (name, left) in enumerate(todo, 1):
        start = time.time()
        finished = _done(path, retry) - done  # another run on the same file may have done it since
        left = [key for key in left if (name, key) not in finished]
        if not left:
            continue
        found = run_model(name, left, timeout)
        with path.open("a") as handle:
            for result in found:
                handle.write(json.dumps({**result, "load": load_average()}) + "\n")
        average = (time.time() - began) / index
        print(
            f"[{index}/{len(todo)}] {name}: {time.time() - start:.0f} s; "
            + "; ".join(f"{r['recipe']} {cell(r)}" for r in found)
            + f" (average {average:.0f} s a model, about {average * (len(todo) - index) / 60:.0f} min left)",
            file=sys.stderr,
            flush=True,
        )
    return read(path)


def main(
    keys: list[str],
    timeout: float,
    results: str | None,
    only: list[str] | None,
    json_out: str | None,
    summary_only: bool,
    retry: list[str],
) -> int:
    """``python -m bench.zoo --wide``: run what is left (unless ``summary_only``), then print the summary."""
    path = Path(results) if results else RESULTS
    found = read(path) if summary_only else run(keys, timeout, path, only, retry)
    listed = set(models())  # results of models since dropped from the list (a remade family list) are not counted
    report = summary([*(r for r in found if r["model"] in listed), *not_built(keys)], keys)
    report["load_average_at_end"] = load_average()
    print(render(report, keys))
    print(f"\nload average: {report['load_average_at_end']}")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    return 0
