"""Run the benchmark cases: ``python -m bench [--quick] [--case NAME ...] [--out DIR]``.

Each case runs its baseline and every variant in one process, with a fixed number of torch
threads, timing them interleaved after a warm-up and reporting medians. Cases whose wheels
are missing are skipped with the reason (and the install command) printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.harness import BENCH_DIR, Settings, environment, settings_for
from bench.report import CaseResult, markdown

CASES = ("digits", "mnist", "mnist_prune", "minilm", "overhead")


def case_module(name: str) -> ModuleType:
    """The module ``bench.cases.<name>``."""
    return importlib.import_module(f"bench.cases.{name}")


def run_case(name: str, settings: Settings) -> CaseResult:
    """Run one case (or record why it was skipped), with its environment filled in."""
    module = case_module(name)
    reason = module.missing()
    if reason:
        result = CaseResult(name, module.TITLE, [], [], skipped=reason)
    else:
        torch.set_num_threads(settings.threads)
        engine = torch.backends.quantized.engine  # a recipe's backend (onednn) switches it for the process
        start = time.perf_counter()
        try:
            result = module.run(settings)
        finally:
            torch.backends.quantized.engine = engine
        result.settings.setdefault("case_seconds", round(time.perf_counter() - start, 1))
    result.environment = environment(settings)
    return result


def write_summary(out: Path) -> Path:
    """``<out>/summary.md``: every case whose JSON is in ``out``, in the usual order."""
    found = [out / f"{name}.json" for name in CASES if (out / f"{name}.json").is_file()]
    results = [CaseResult.from_dict(json.loads(path.read_text(encoding="utf-8"))) for path in found]
    path = out / "summary.md"
    path.write_text(markdown(results), encoding="utf-8")
    return path


def run_cases(names: list[str], settings: Settings, out: Path | None, echo: bool = True) -> list[CaseResult]:
    """Run ``names`` in order, print each table as it finishes, and write ``<out>/<case>.json``."""
    results = []
    for name in names:
        try:
            result = run_case(name, settings)
        except Exception:  # one broken case must not lose the others' results
            traceback.print_exc()
            print(f"== {name}: FAILED (traceback above)", flush=True)
            continue
        if echo:
            print(result.text() if not result.skipped else f"== {name}: skipped: {result.skipped}", flush=True)
            print(flush=True)
        if out is not None:
            result.write(out)
        results.append(result)
    return results


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer epochs and rounds (a few minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite (figures are not meaningful)")
    parser.add_argument("--case", action="append", choices=CASES, help="run only this case (repeatable)")
    parser.add_argument("--out", type=Path, help="folder for the JSON results (default bench/results, or bench/results/quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``."""
    args = parse(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = args.out or (BENCH_DIR / "results" if mode == "full" else BENCH_DIR / "results" / mode)
    with tempfile.TemporaryDirectory(prefix="torchslim-bench-") as work:
        settings = settings_for(mode, args.threads, Path(work))
        start = time.perf_counter()
        results = run_cases(list(args.case or CASES), settings, out)
    write_summary(out)
    ran = [r.case for r in results if not r.skipped]
    failed = len(args.case or CASES) - len(results)
    print(
        f"{mode} run: {len(ran)} case(s) in {time.perf_counter() - start:.0f}s; results in {out}"
        + (f"; {failed} FAILED" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
