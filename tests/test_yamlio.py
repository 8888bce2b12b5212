"""Safe YAML loading with positions."""

from __future__ import annotations

import time

import pytest

from torchslim import RecipeError
from torchslim.engine.yamlio import parse_yaml


def test_positions_point_at_values() -> None:
    doc = parse_yaml("name: x\nstages:\n  - type: prune\n    amount: 0.5\n", "r.yaml")
    assert doc.data == {"name": "x", "stages": [{"type": "prune", "amount": 0.5}]}
    assert doc.where(("stages", 0, "amount")) == "r.yaml:4:13"
    assert doc.where(("name",)) == "r.yaml:1:7"


def test_missing_key_falls_back_to_parent() -> None:
    doc = parse_yaml("model:\n  kwargs: {}\n", "r.yaml")
    assert doc.where(("model", "target")) == "r.yaml:2:3"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: !!python/object/apply:os.system ['echo hacked']\n", "Python object tags are not allowed"),
        ("a: [1, 2\n", "r.yaml:2:1"),
        ("", "the file is empty"),
        ("a: b: c\n", "r.yaml:1:5"),
    ],
    ids=["python-tag", "unclosed-list", "empty", "bad-mapping"],
)
def test_bad_yaml_is_a_recipe_error(text: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_yaml(text, "r.yaml")
    assert expected in str(info.value)


def test_billion_laughs_is_refused_quickly() -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(9))}]" for i in range(1, 10)]
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="anchors and aliases"):
        parse_yaml("\n".join(lines) + "\n", "bomb.yaml")
    assert time.perf_counter() - start < 5.0


def test_small_aliases_are_allowed() -> None:
    doc = parse_yaml("base: &b {amount: 0.5}\nstages: [*b, *b]\n")
    assert doc.data["stages"] == [{"amount": 0.5}, {"amount": 0.5}]
