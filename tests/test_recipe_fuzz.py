"""Property: any recipe text either validates or fails with a located RecipeError, nothing else."""

from __future__ import annotations

import re
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim import RecipeError, Registry
from torchslim.engine.recipe import validate
from torchslim.engine.yamlio import parse_yaml

from .conftest import digits_recipe

REGISTRY = Registry.load(autoload=False)
BASE = digits_recipe(
    [
        {"type": "prune", "amount": 0.5, "exclude": ["classifier"]},
        {"type": "distill", "teacher": {"target": "a:b", "kwargs": {"x": 1}}, "epochs": 2},
        {"type": "quantize", "dtype": "qint8", "modules": ["Linear"]},
    ]
)
LOCATED = re.compile(r"^recipe\.yaml(:\d+:\d+)?: ")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["prune", "quantize", "distill", "global", "Linear", "a:b"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6
)


def paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in ``data``."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += paths(value, prefix + (index,))
    return found


def mutate(data: Any, path: tuple, action: str, value: Any) -> Any:
    """Replace, delete, or add a sibling key at ``path``."""
    if not path:
        return value if action == "replace" else data
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"extra_{len(parent)}"] = value
    return data


@st.composite
def recipe_texts(draw: st.DrawFn) -> str:
    """A valid recipe, mutated a few times, as YAML text, sometimes with corrupted characters."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(paths(data)))
        data = mutate(data, path, draw(st.sampled_from(["replace", "delete", "add"])), draw(values))
    text = yaml.safe_dump(data, sort_keys=False)
    if draw(st.booleans()) and text:
        at = draw(st.integers(0, len(text) - 1))
        text = (
            text[:at]
            + draw(st.sampled_from([":", "- ", "{", "]", "&a ", "*a", "!!python/name:os.system ", "\t", "'"]))
            + text[at:]
        )
    return text


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe_texts())
def test_every_recipe_validates_or_fails_located(text: str) -> None:
    try:
        validate(parse_yaml(text, "recipe.yaml"), REGISTRY)
    except RecipeError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert LOCATED.match(problem), problem


def test_the_unmutated_base_is_valid() -> None:
    recipe = validate(parse_yaml(yaml.safe_dump(BASE), "recipe.yaml"), REGISTRY)
    assert len(recipe.stage_list) == 3
