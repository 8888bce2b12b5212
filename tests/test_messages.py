"""Mistakes in a recipe answered in words: duplicate keys, patterns that match nothing, forms, close names."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from torchslim import RecipeError, Registry, StageError, load_recipe
from torchslim.engine.report import Report, Row
from torchslim.engine.summary import summary
from torchslim.engine.yamlio import parse_yaml
from torchslim.examples import digits
from torchslim.plugins.prune import PruneStage
from torchslim.plugins.quantize import QuantizeStage

from .conftest import CliResult, digits_recipe, make_ctx, write_recipe


def test_duplicate_keys_name_both_places(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("name: twice\nstages:\n  - {type: prune, amount: 0.5}\nseed: 0\nstages:\n  - {type: quantize}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry)
    assert str(info.value) == (
        f"{path}:5:1: duplicate key 'stages' (first at {path}:2:1); a mapping holds each key "
        "once, and YAML would keep only the last"
    )


def test_duplicate_keys_inside_a_stage(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("name: twice\nstages:\n  - {type: prune, amount: 0.5, amount: 0.7}\n")
    with pytest.raises(RecipeError, match=rf"{re.escape(str(path))}:3:32: duplicate key 'amount' \(first at .*:3:19\)"):
        load_recipe(path, registry)


def test_merge_keys_may_be_overridden() -> None:
    # YAML's merge key brings in keys that the mapping may then set again: not a duplicate.
    data = parse_yaml("a: &a {b: 1, c: 2}\nd:\n  <<: *a\n  b: 3\n").data
    assert data["d"] == {"b": 3, "c": 2}


@pytest.mark.parametrize(
    ("options", "family"),
    [
        ({"type": "prune", "amount": 0.5, "exclude": ["clasifier"]}, PruneStage),
        ({"type": "prune", "method": "structured", "amount": 0.3, "exclude": ["clasifier"]}, PruneStage),
        ({"type": "quantize", "exclude": ["clasifier"]}, QuantizeStage),
    ],
    ids=["magnitude", "structured", "dynamic"],
)
def test_exclude_that_matches_no_layer(images: dict, options: dict[str, Any], family: type) -> None:
    stage = family.from_options(**options)
    if options.get("method") == "structured":
        pytest.importorskip("torch_pruning")
    model = digits.resnet(width=8, blocks=1)
    with pytest.raises(
        StageError,
        match=r"exclude: pattern 'clasifier' matches no layer of the model; "
        r"close names: classifier",
    ):
        stage.apply(model, make_ctx(model, images))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model": {"target": "pkg.mod.func"}},
            "model.target: expected 'module:callable', e.g. mynet:build, found 'pkg.mod.func'; did you mean 'pkg.mod:func'?",
        ),
        ({"data": {"target": "loaders"}}, "data.target: expected 'module:callable', e.g. mynet:build, found 'loaders'"),
        (
            {"evaluate": {"metric": "acc"}},
            "evaluate.metric: expected 'accuracy' or a 'module:callable' taking (model, "
            "loader), e.g. mymetrics:f1, found 'acc'; did you mean 'accuracy'?",
        ),
        (
            {"device": "gpu"},
            "device: expected cpu, cuda or cuda:N (a GPU by number, e.g. cuda:0), found 'gpu'; did you mean 'cuda'?",
        ),
        ({"device": "cuda1"}, "found 'cuda1'; did you mean 'cuda:1'?"),
        ({"sed": 1}, "sed: unknown field 'sed'; did you mean 'seed'?"),
        ({"metrics": {"warmups": 1}}, "metrics.warmups: unknown field 'warmups'; did you mean 'warmup'?"),
        (
            {"stages": [{"type": "prune", "ammount": 0.5}]},
            "stages[0].ammount (prune): unknown field 'ammount'; did you mean 'amount'? prune accepts: type, name",
        ),
    ],
    ids=["dotted-target", "bare-target", "metric", "device", "device-number", "top-key", "section-key", "stage-key"],
)
def test_plain_messages(tmp_path: Path, registry: Registry, change: dict[str, Any], message: str) -> None:
    recipe = {**digits_recipe([{"type": "prune", "amount": 0.5}]), **change}
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, recipe), registry)
    assert message in str(info.value)
    assert "pattern" not in str(info.value)


def validate_model_target(tmp_path: Path, cli: Callable[..., CliResult], target: str) -> CliResult:
    """``torchslim validate`` on a small prune recipe whose model target is ``target``."""
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}])
    recipe["model"]["target"] = target
    return cli("validate", str(write_recipe(tmp_path, recipe)))


def test_file_name_as_target(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    result = validate_model_target(tmp_path, cli, "models/mynet.py:build")
    assert result.returncode == 2
    assert "found 'models/mynet.py:build'; did you mean 'models.mynet:build'?" in result.stderr
    result = validate_model_target(tmp_path, cli, "mynet.py:build")
    assert "model.target: cannot import module 'mynet.py': ModuleNotFoundError" in result.stderr
    assert "did you mean 'mynet:build'?" in result.stderr


def test_attribute_typo_gets_a_close_name(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    result = validate_model_target(tmp_path, cli, "torchslim.examples.digits:mpl")
    assert result.returncode == 2
    assert "model.target: module 'torchslim.examples.digits' has no attribute 'mpl'; did you mean 'mlp'?" in result.stderr


def test_quiet_after_the_subcommand_and_a_narrow_terminal(
    tmp_path: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    recipe = digits_recipe([{"type": "prune", "amount": 0.5}], train_epochs=0)
    result = cli("run", "-q", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress lines
    assert max(len(line) for line in result.stdout.splitlines()) <= 100
    assert "MACs (x fewer)" in result.stdout and "accuracy (change)" in result.stdout


def test_summary_fits_the_width_it_is_given() -> None:
    figures = {
        "params": 85_000,
        "nonzero": 25_000,
        "sparsity": 0.7,
        "size_bytes": 342_700,
        "packed_bytes": 122_000,
        "macs": 84_500,
        "latency_ms": 0.12,
        "accuracy": 94.1,
        "seconds": 0.13,
    }
    report = Report(
        {"name": "x"},
        rows=[Row("baseline", None, figures), Row("a-long-stage-name", "prune", figures)],
        notes=["a note that goes on " * 12],
    )
    wide = summary(report, None)
    assert wide == report.table()  # a file or a pipe gets the full table
    for width in (100, 60):
        text = summary(report, width)
        assert max(len(line) for line in text.splitlines()) <= width
        assert text.count("a-long-stage-name") >= 2  # each block of columns names the stages
        assert "94.10 (+0.00)" in text and "342.7kB (1.00x)" in text
