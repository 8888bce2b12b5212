"""docs/ARCHITECTURE.md's rules on who imports whom, checked by reading every module's imports.

Each rule here is a sentence of ARCHITECTURE.md ("Who imports whom"); a change that breaks one fails
here, so the page stays true as the code moves.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "torchslim"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[str]:
    """Every torchslim module ``path`` imports (at any depth of the file), relative imports resolved."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("torchslim"))
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            if name.startswith("torchslim"):
                # "from . import names" imports the module torchslim.engine.names
                yield from ([f"{name}.{a.name}" for a in node.names] if not node.module else [name])


#: Imports kept for one release so that old names still work (each warns when used); not rules broken.
DEPRECATED = {("torchslim.plugins.deploy", "torchslim.export")}
EDGES = sorted({(_module(path), target) for path in PACKAGE.rglob("*.py") for target in _imports(path)} - DEPRECATED)


def _within(module: str, area: str) -> bool:
    return module == area or module.startswith(area + ".")


def _family(module: str) -> str | None:
    """``torchslim.plugins.prune`` for anything inside plugins/prune/ (or plugins/distill.py); None for the shared core."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "plugins" or parts[2].startswith("_"):
        return None
    return ".".join(parts[:3])


def _private(module: str) -> bool:
    return any(part.startswith("_") and part != "__init__" for part in module.split(".")[2:])


def _broken(rule: str) -> list[tuple[str, str]]:
    checks = {
        "engine imports only engine": lambda a, b: _within(a, "torchslim.engine") and not _within(b, "torchslim.engine"),
        "compare imports only engine": lambda a, b: (
            _within(a, "torchslim.compare") and not (_within(b, "torchslim.engine") or _within(b, "torchslim.compare"))
        ),
        "plugins import only engine and plugins": lambda a, b: (
            _within(a, "torchslim.plugins") and not (_within(b, "torchslim.engine") or _within(b, "torchslim.plugins"))
        ),
        "the shared core imports no family": lambda a, b: (
            _within(a, "torchslim.plugins") and _family(a) is None and _family(b) is not None
        ),
        "a family reaches another only through its package": lambda a, b: (
            _family(a) is not None and _family(b) not in (None, _family(a)) and b != _family(b)
        ),
        "outside its family, no one imports a family's modules": lambda a, b: (
            _family(b) is not None and _family(a) != _family(b) and b != _family(b)
        ),
        "examples import only engine": lambda a, b: (
            _within(a, "torchslim.examples") and not (_within(b, "torchslim.engine") or _within(b, "torchslim.examples"))
        ),
        "search imports only engine and compare": lambda a, b: (
            _within(a, "torchslim.search")
            and not any(_within(b, f"torchslim.{area}") for area in ("engine", "compare", "search"))
        ),
        "nothing but cli imports search": lambda a, b: (
            _within(b, "torchslim.search") and not _within(a, "torchslim.search") and a != "torchslim.cli"
        ),
    }
    return [(a, b) for a, b in EDGES if checks[rule](a, b)]


RULES = [
    "engine imports only engine",
    "compare imports only engine",
    "plugins import only engine and plugins",
    "the shared core imports no family",
    "a family reaches another only through its package",
    "outside its family, no one imports a family's modules",
    "examples import only engine",
    "search imports only engine and compare",
    "nothing but cli imports search",
]


@pytest.mark.parametrize("rule", RULES)
def test_import_rule_holds(rule: str) -> None:
    assert _broken(rule) == [], rule


@pytest.mark.parametrize(
    ("extra", "module"),
    [("optuna", "torchslim.search.study"), ("ray", "torchslim.compare.executors"), ("mlflow", "torchslim.engine.tracking")],
)
def test_an_optional_extra_is_imported_by_one_module(extra: str, module: str) -> None:
    """Optuna, Ray and MLflow are optional extras: one module imports each, inside a function that names the extra
    when it is missing."""
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(name.split(".")[0] == extra for name in names):
                importers.append(_module(path))
    assert sorted(set(importers)) == [module]


def test_every_rule_is_written_in_architecture_md() -> None:
    page = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    assert [rule for rule in RULES if rule not in page] == []


def test_no_single_family_helper_at_the_top_of_plugins() -> None:
    """A helper module at plugins/ top is shared: two families import it, or another module of the shared core."""
    lonely = []
    for path in (PACKAGE / "plugins").glob("_*.py"):
        if path.name == "__init__.py":
            continue
        users = [a for a, b in EDGES if b == _module(path) and _within(a, "torchslim.plugins")]
        if len({_family(u) for u in users} - {None}) < 2 and all(_family(u) for u in users):
            lonely.append((path.name, sorted(users)))
    assert lonely == []


def test_the_rules_can_fail() -> None:
    # The checker itself: an engine module importing a plugin, a family importing another's private module.
    global EDGES
    saved = EDGES
    EDGES = [
        ("torchslim.engine.runner", "torchslim.plugins.prune"),
        ("torchslim.plugins.prune.structured", "torchslim.plugins.quantize._ao"),
    ]
    try:
        assert _broken("engine imports only engine") and _broken("a family reaches another only through its package")
    finally:
        EDGES = saved
