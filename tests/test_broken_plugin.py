"""A broken third-party plugin, really installed: listed with its reason, harmless to other recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import digits_recipe, write_recipe
from .support.pip import install_into
from .test_plugin_package import torchslim

# pip, then torch imported by each subprocess: CI runs these in its second step. The registry's
# handling of broken plugins is tested in this process by test_registry.py.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.21"]
build-backend = "hatchling.build"

[project]
name = "torchslim-broken-example"
version = "0.0.1"

[project.entry-points."torchslim.stages"]
shiny = "torchslim_broken:ShinyStage"

[tool.hatch.build.targets.wheel]
include = ["torchslim_broken.py"]
"""

MODULE = '''"""A plugin whose import fails: it needs a package that is not installed."""
import a_dependency_nobody_installed  # noqa: F401
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the broken plugin installed by pip."""
    source = tmp_path_factory.mktemp("broken-src")
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "torchslim_broken.py").write_text(MODULE)
    target = tmp_path_factory.mktemp("broken-site")
    install_into(source, target)
    return target


def test_plugins_lists_it_as_broken_with_the_reason(site: Path) -> None:
    result = torchslim(site, "plugins", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("shiny"))
    assert "torchslim-broken-example 0.0.1" in line
    assert "broken: import failed: ModuleNotFoundError: No module named 'a_dependency_nobody_installed'" in line
    assert any(line.startswith("prune") and line.rstrip().endswith("ok") for line in result.stdout.splitlines())


def test_other_recipes_still_run(site: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, digits_recipe([{"type": "prune", "amount": 0.5}]))
    result = torchslim(site, "-q", "run", str(path), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "prune" in result.stdout


def test_a_recipe_using_it_gets_a_clear_error(site: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, digits_recipe([{"type": "shiny"}]))
    result = torchslim(site, "validate", str(path), cwd=ROOT)
    assert result.returncode == 2
    assert "stage type 'shiny' comes from a plugin that is broken (torchslim-broken-example 0.0.1)" in result.stderr
    assert "Traceback" not in result.stderr
