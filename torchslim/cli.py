"""The ``torchslim`` command: the only place that prints errors and chooses exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .engine import distributed
from .engine.checkpoints import checkpointed_stages
from .engine.checks import check_recipe_code
from .engine.errors import OutputError, TorchslimError, UsageError
from .engine.recipe import RecipeBase, load_recipe, recipe_model
from .engine.registry import Registry
from .engine.runner import run
from .engine.summary import summary
from .engine.tracking import check_tracking, open_tracker
from .engine.version import VERSION
from .engine.words import plural
from .engine.yamlio import read_yaml


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        return int(args.handler(args))
    except TorchslimError as exc:
        return _report_error(exc, args)
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        print("torchslim: interrupted", file=sys.stderr)
        if getattr(args, "out", None) and args.command == "run":
            print(f"torchslim: {_checkpoint_words(Path(args.out))}", file=sys.stderr)
        elif getattr(args, "out", None) and args.command == "search":
            print(f"torchslim: finished trials are kept in {args.out}; rerun with --resume to continue", file=sys.stderr)
        elif getattr(args, "out", None):
            print(f"torchslim: finished variants are kept in {args.out}; rerun the same command to continue", file=sys.stderr)
        return 130


def _checkpoint_words(out: Path) -> str:
    done = checkpointed_stages(out)
    if not done:
        return f"no stage had completed, so nothing is checkpointed in {out}"
    return f"{plural(done, 'completed stage')} checkpointed in {out}; rerun with --resume to continue from there"


def _report_error(exc: TorchslimError, args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    if debug:
        logging.getLogger("torchslim").exception("details")
    print(f"torchslim: error: {_cli_words(exc)}", file=sys.stderr)
    if exc.log_path is not None and not debug:
        print(f"torchslim: the traceback is in {exc.log_path} (or rerun with --debug)", file=sys.stderr)
    elif exc.__cause__ is not None and not debug and hasattr(args, "debug"):
        print("torchslim: rerun with --debug to see the traceback", file=sys.stderr)
    return exc.exit_code


def _cli_words(exc: TorchslimError) -> str:
    # Library errors name the Python keywords (overwrite=True); on the command line they are flags.
    if isinstance(exc, OutputError):
        words = {"another out directory": "another --out", "overwrite=True": "--overwrite", "resume=True": "--resume"}
        text = str(exc)
        for python, flag in words.items():
            text = text.replace(python, flag)
        return text
    return str(exc)


def _closed_pipe() -> int:
    """The reader of stdout went away (``torchslim run R | head``): end quietly, as Python's docs advise."""
    try:
        # Python flushes stdout again at exit; point it at devnull so that flush cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchslim", description="Declarative network compression for PyTorch.")
    parser.add_argument("--version", action="version", version=f"torchslim {VERSION}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no progress lines")
    # -q is accepted after the subcommand too (torchslim run -q R); SUPPRESS keeps the top-level value.
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="print no progress lines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[quiet], help="run a recipe and print its stage-by-stage summary")
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("--out", type=Path, help="write reports, the resolved recipe and the final model here")
    p.add_argument("--overwrite", action="store_true", help="allow --out to be a non-empty directory")
    p.add_argument("--resume", action="store_true", help="reuse the stage checkpoints in --out whose recipe prefix is unchanged")
    p.add_argument("--track", metavar="mlflow[:URI]", help="log to MLflow (default store: mlflow.db beside --out; docs/scale.md)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    p.set_defaults(handler=_run)

    p = sub.add_parser("compare", parents=[quiet], help="run several recipes (sweeps expanded) and compare them side by side")
    p.add_argument(
        "recipes",
        type=Path,
        nargs="+",
        help="recipe YAML files, or folders of them (each *.yaml); a recipe with sweep: gives one variant per value",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write comparison.{json,csv,md,html,png} and each variant's report directory here; "
        "a repeated command reuses the variants that finished",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants run at once in separate processes, the cores divided between them (default 1: "
        "latency figures undisturbed)",
    )
    p.add_argument(
        "--executor",
        default="local",
        metavar="local|ray[:ADDRESS]",
        help="local processes (default) or tasks of a Ray cluster (pip install 'torchslim[ray]'; docs/scale.md)",
    )
    p.add_argument("--track", metavar="mlflow[:URI]", help="log to MLflow (default store: mlflow.db beside --out; docs/scale.md)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    p.set_defaults(handler=_compare)

    p = sub.add_parser("search", parents=[quiet], help="search a recipe's search: space with Optuna for the best trade-offs")
    p.add_argument("recipe", type=Path, help="recipe YAML file with a search: block")
    p.add_argument("--out", type=Path, required=True, help="the study, front.{json,md,png}, best.yaml and trials/ go here")
    p.add_argument("--resume", action="store_true", help="continue the search in --out: finished trials are not run again")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trials at once in separate processes, the cores divided between them (default 1: latency undisturbed)",
    )
    p.add_argument(
        "--executor",
        default="local",
        metavar="local|ray[:ADDRESS]",
        help="local processes (default) or tasks of a Ray cluster (pip install 'torchslim[ray]'; docs/scale.md)",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="keep the study in this database (sqlite:///F.db, postgresql://...), shared by searches run with "
        "--resume (default: study.journal in --out)",
    )
    p.add_argument("--track", metavar="mlflow[:URI]", help="log to MLflow (default store: mlflow.db beside --out; docs/scale.md)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    p.set_defaults(handler=_search)

    p = sub.add_parser(
        "sensitivity",
        parents=[quiet],
        help="measure what each layer or group of coupled layers loses, compressed alone at a few settings",
    )
    p.add_argument("recipe", type=Path, help="recipe YAML file (its structured prune and low-bit quantize stages are measured)")
    p.add_argument(
        "--out", type=Path, required=True, help="sensitivity.{json,md,png} and the cache (sensitivity-cache-*.json) go here"
    )
    p.add_argument(
        "--stage",
        type=int,
        action="append",
        help="measure this stage (its index; repeatable; default: every stage that can be measured)",
    )
    p.add_argument("--settings", help="the bits or amounts to try, comma-separated (default 1,2,4,8 bits; 0.25,0.5,0.75)")
    p.add_argument("--batches", type=int, default=8, help="calibration batches compared (default 8)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    p.set_defaults(handler=_sensitivity)

    p = sub.add_parser("export", parents=[quiet], help="export a finished float run to ONNX or OpenVINO, beside its model.pt")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the --out directory of a finished torchslim run")
    p.add_argument(
        "--to",
        required=True,
        choices=["onnx", "openvino"],
        help="onnx: RUN_DIR/model.onnx (checked in ONNX Runtime); openvino: RUN_DIR/model.xml + model.bin",
    )
    p.add_argument("--opset", type=int, help="ONNX opset of the export (default 18, at least 17)")
    p.add_argument(
        "--exporter",
        choices=["auto", "dynamo", "torchscript", "openvino"],
        help="dynamo or torchscript (torch's ONNX exporters), openvino (OpenVINO's converter, --to openvino); "
        "default auto: openvino for --to openvino, dynamo for onnx",
    )
    p.add_argument(
        "--dynamic-axes",
        metavar="DIMS",
        help="input dimensions left dynamic, comma-separated (default 0, the batch; 0,1 for a text model)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        help="largest allowed difference from torch's outputs, relative to the largest output (default 1e-4)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    p.set_defaults(handler=_export)

    p = sub.add_parser("validate", parents=[quiet], help="check a recipe without running it")
    p.add_argument("recipe", type=Path)
    p.add_argument(
        "--no-import",
        action="store_true",
        help="check the recipe's shape only: import nothing it names (model, data, metric code)",
    )
    p.set_defaults(handler=_validate)

    p = sub.add_parser("plugins", help="list stage types and where they come from")
    p.set_defaults(handler=_plugins)

    p = sub.add_parser("schema", help="print the recipe JSON Schema")
    p.set_defaults(handler=_schema)
    return parser


def _configure_logging(quiet: bool) -> None:
    logger = logging.getLogger("torchslim")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("torchslim: %(message)s"))
        logger.addHandler(handler)
    # Its own handler prints the lines: a root handler that a library sets up on import (NNCF's) must
    # not print each one again as "INFO:torchslim:...".
    logger.propagate = False
    # Under torchrun only rank 0 reports progress; the others would repeat every line.
    logger.setLevel(logging.WARNING if quiet or not distributed.is_main() else logging.INFO)


def _run(args: argparse.Namespace) -> int:
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out DIR (the directory of the run to continue)")
    if args.track:
        check_tracking(args.track)  # a missing extra named before the run, not after
    report = run(args.recipe, args.out, overwrite=args.overwrite, resume=args.resume)
    if not distributed.is_main():
        return 0
    if args.track:
        tracker = open_tracker(args.track, args.out)
        tracker.log_run(str(report.recipe.get("name", "run")), args.out, report, tags={"torchslim.command": "run"})
    print(summary(report))
    if args.out:
        print(
            f"\nwrote {args.out}/report.json, report.md, report.csv, recipe.yaml, model.pt "
            f"(load with torchslim.load_model('{args.out}'))"
        )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .compare.export import written_line

    comparison = compare(args.recipes, args.out, jobs=args.jobs, executor=args.executor, track=args.track)
    print(comparison.text())
    if args.out:
        print(f"\n{written_line(comparison)}")
    return comparison.exit_code


def _search(args: argparse.Namespace) -> int:
    from .search import search
    from .search.files import front_table, summary_lines

    result = search(
        args.recipe, args.out, resume=args.resume, jobs=args.jobs, executor=args.executor, storage=args.storage, track=args.track
    )
    print("\n".join([front_table(result.state), *summary_lines(result.state)]))
    print(f"\nwrote {args.out}/front.json, front.md, front.png, best.yaml and trials/ (one report per trial)")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from .search.sensitivity import measure
    from .search.sensitivity_files import text, write_files

    if args.batches < 1:
        raise UsageError(f"--batches {args.batches}: give at least 1")
    if args.out.exists() and not args.out.is_dir():
        raise OutputError(f"{args.out}: exists and is not a directory")
    recipe = load_recipe(args.recipe, Registry.load())
    result = measure(recipe, args.out, stages=args.stage, settings=_numbers(args.settings), batches=args.batches)
    print(text(result))
    print(f"\nwrote {', '.join(str(p) for p in write_files(args.out, result))}")
    return 0


def _numbers(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--settings: expected numbers separated by commas (1,2,4,8 or 0.25,0.5), found '{text}'") from None


def _export(args: argparse.Namespace) -> int:
    # Imported here: the engine (and this command line) work without the deploy extras installed.
    from .export import export_run

    options = {
        key: value
        for key, value in (("opset", args.opset), ("exporter", args.exporter), ("tolerance", args.tolerance))
        if value is not None
    }
    if args.dynamic_axes is not None:
        options["dynamic_axes"] = _dims(args.dynamic_axes)
    print(export_run(args.run_dir, args.to, overwrite=args.overwrite, **options).line())
    return 0


def _dims(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--dynamic-axes: expected input dimensions separated by commas (0 or 0,1), found '{text}'") from None


def _validate(args: argparse.Namespace) -> int:
    registry = Registry.load()
    recipe = load_recipe(args.recipe, registry)
    checked = "" if args.no_import else "; its model, data and metric targets import and take their kwargs"
    if recipe.sweep:
        return _validate_sweep(args, recipe, registry, checked)
    if recipe.search:
        from .search.plan import check_search

        check_search(recipe.document or read_yaml(args.recipe), recipe, registry)
    if not args.no_import:
        check_recipe_code(recipe)
    stages = ", ".join(f"{s.label} ({s.type})" for s in recipe.stage_list)
    kind = "recipe"
    if recipe.search:
        kind = f"search recipe (each value of its {plural(len(recipe.search.space), 'dimension')} valid)"
    print(f"{args.recipe}: valid {kind} '{recipe.name}' with {plural(len(recipe.stage_list), 'stage')}: {stages}{checked}")
    return 0


def _validate_sweep(args: argparse.Namespace, recipe: RecipeBase, registry: Registry, checked: str) -> int:
    """Every variant of a sweep validated (and its targets imported) as ``compare`` would run it."""
    from .compare.sweep import expand

    variants = expand(recipe.document or read_yaml(args.recipe), recipe, registry)
    if not args.no_import:
        for _, concrete in variants:
            check_recipe_code(concrete)
    print(
        f"{args.recipe}: valid sweep recipe '{recipe.name}' with {len(variants)} variants, each valid{checked} "
        f"(run them with torchslim compare):"
    )
    for variant, _ in variants:
        print(f"  {variant.name}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    registry = Registry.load()
    rows = [[e.type, e.origin, e.target, "ok" if e.ok else f"broken: {e.error}"] for e in registry.entries]
    print(tabulate(rows, headers=["type", "from", "class", "status"]))
    return 0


def _schema(args: argparse.Namespace) -> int:
    schema = recipe_model(Registry.load()).model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
