"""The zoo's ``search4`` recipe: a 4-trial ``torchslim search`` on one zoo model, judged by how it ends.

The space is the structured amount (10 to 50% of the channels) and the quantization method (int8 dynamic or
static); the objectives are agreement with the uncompressed model (a tiny eval: 16 random inputs) and MACs,
latency is not timed. A search ends one of three ways, which is what this recipe records:

- ``finished``: the search ran its 4 trials (a trial may fail: it is recorded with its error, as a search does);
- ``clean``: the search stopped with a torchslim error (one line naming the field at fault);
- ``raw``: another exception escaped (what a user would see as a raw traceback).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from torchslim.engine.errors import TorchslimError, first_line

TRIALS = 4
EVAL_SAMPLES = 16  # the tiny eval: the search is checked to run, not to find a good trade-off


def recipe(name: str, graph_seconds: int) -> dict[str, Any]:
    """The search recipe of zoo model ``name``."""
    structured = {"type": "prune", "name": "structured", "method": "structured", "amount": 0.3, "time_limit": graph_seconds}
    return {
        "name": f"zoo-{name}-search4",
        "seed": 0,
        "model": {"target": "bench.zoo:build", "kwargs": {"name": name}},
        "data": {"target": "bench.zoo:data", "kwargs": {"name": name, "samples": EVAL_SAMPLES}},
        "evaluate": {"metric": "accuracy", "name": "agreement"},
        "metrics": {"latency": False},
        "stages": [structured, {"type": "quantize", "name": "quantize", "method": "dynamic"}],
        "search": {
            "space": {"stages.0.amount": {"low": 0.1, "high": 0.5}, "stages.1.method": {"choices": ["dynamic", "static"]}},
            "objectives": ["metric", "macs"],
            "trials": TRIALS,
            "startup_trials": TRIALS,
            "seed": 0,
        },
    }


def run_search(name: str, graph_seconds: int) -> dict[str, Any]:
    """Run the 4-trial search on ``name``: how it ended, and its trials' counts (the zoo's result row)."""
    from torchslim.search import search

    with tempfile.TemporaryDirectory() as out:
        try:
            result = search(recipe(name, graph_seconds), out, log=logging.getLogger("zoo.quiet"))
        except TorchslimError as exc:
            return {"ok": False, "end": "clean", "error": first_line(exc, typed=True, limit=400)}
        except Exception as exc:  # what the CLI would show as a traceback: the failure this recipe looks for
            from bench.zoo import origin

            return {"ok": False, "end": "raw", "error": first_line(exc, typed=True, limit=400), **origin(exc)}
    ran = [r for r in result.records if r.ok]
    failed = [r for r in result.records if r.error is not None]
    best = result.answer.best
    return {
        "ok": True,
        "end": "finished",
        "trials_ok": len(ran),
        "trials_failed": len(failed),
        "trial_errors": [r.error[:200] for r in failed if r.error][:2],
        "agreement": None if best is None else best.final.get("agreement"),
        "macs": None
        if best is None or not best.final.get("macs") or not best.baseline.get("macs")
        else best.baseline["macs"] / best.final["macs"],
    }


def counts(results: list[dict[str, Any]]) -> str:
    """``search4: 30 finished (112 trials ran, 8 failed cleanly), 2 stopped with a clean error, 0 raw tracebacks, 1 timeout``."""
    rows = [r for r in results if r["recipe"] == "search4"]
    if not rows:
        return ""
    done = [r for r in rows if r.get("end") == "finished"]
    clean = [r for r in rows if r.get("end") == "clean"]
    raw = [r for r in rows if r.get("end") == "raw"]
    other = [r for r in rows if r.get("end") is None]  # the subprocess stopped: a timeout, or it died
    return (
        f"search4: {len(done)}/{len(rows)} finished ({sum(r['trials_ok'] for r in done)} trials ran, "
        f"{sum(r['trials_failed'] for r in done)} failed with a clean error), {len(clean)} stopped with a clean error, "
        f"{len(raw)} raw traceback(s), {len(other)} stopped by the zoo (timeout or died)"
    )
