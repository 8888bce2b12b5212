"""The stage registry over real distribution metadata: built-ins, plugins, and broken plugins.

Each test writes ``<name>-<version>.dist-info`` folders and plugin modules into its own
``tmp_path`` and loads a fresh registry from there, so nothing installed in the environment
(and no other test) affects it.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim import Context, PluginError, RecipeError, Registry, Stage, StageEntry, load_recipe
from torchslim.engine.registry import AUTOLOAD_ENV
from torchslim.plugins.deploy import DeployStage
from torchslim.plugins.distill import DistillStage
from torchslim.plugins.prune import PruneStage
from torchslim.plugins.quantize import QuantizeStage

from .conftest import digits_recipe

BUILTIN_CLASSES = {"prune": PruneStage, "quantize": QuantizeStage, "distill": DistillStage, "deploy": DeployStage}

STAGE_SOURCE = '''\
"""A plugin stage written for a test."""

from typing import Literal

from torch import nn

from torchslim import Context, Stage


class {cls}(Stage):
    """Records ``level`` in the summary and leaves the model alone."""

    type: Literal["{tag}"] = "{tag}"
    level: int = 1
    """A number reported as a metric."""

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        ctx.add_metric("level", self.level)
        return model
'''


class PluginSite:
    """A folder holding distributions (dist-info metadata) and the modules they point at."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.suffix = re.sub(r"\W", "_", root.name)
        self.modules: list[str] = []

    def module(self, stem: str, source: str) -> str:
        """Write a module named ``<stem>_<suffix>`` (unique to this test) and return its name."""
        name = f"{stem}_{self.suffix}"
        (self.root / f"{name}.py").write_text(source)
        self.modules.append(name)
        return name

    def stage_module(self, stem: str, tag: str, cls: str = "PluginStage") -> str:
        """A module defining a working Stage subclass ``cls`` with type tag ``tag``."""
        return self.module(stem, STAGE_SOURCE.format(cls=cls, tag=tag))

    def dist(self, name: str, version: str, entry_points: dict[str, str]) -> None:
        """Write the metadata of an installed distribution with ``torchslim.stages`` entry points."""
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = "".join(f"{tag} = {target}\n" for tag, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[torchslim.stages]\n{lines}")

    def load(self, **kwargs: bool | None) -> Registry:
        """A fresh registry: the built-ins, then the entry points found in this folder."""
        return Registry.load(path=[str(self.root)], **kwargs)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginSite]:
    """An empty plugin folder on sys.path, with plugin autoload enabled."""
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = PluginSite(tmp_path)
    yield folder
    for name in folder.modules:
        sys.modules.pop(name, None)


def entries_for(registry: Registry, tag: str) -> list[StageEntry]:
    """Every entry registered under ``tag``, broken ones included, in registration order."""
    return [e for e in registry.entries if e.type == tag]


def only_entry(registry: Registry, tag: str) -> StageEntry:
    """The one entry registered under ``tag``."""
    found = entries_for(registry, tag)
    assert len(found) == 1, found
    return found[0]


def make_context(model: nn.Module) -> Context:
    """A minimal context for calling a stage's apply directly."""
    inputs = torch.zeros(2, 4)
    return Context(original=model, data={}, example_inputs=inputs, evaluate=lambda m: 0.0)


# --- built-ins -------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", sorted(BUILTIN_CLASSES), ids=sorted(BUILTIN_CLASSES))
def test_builtin_present_with_origin_builtin(site: PluginSite, tag: str) -> None:
    registry = site.load()
    entry = only_entry(registry, tag)
    assert entry.ok and entry.error is None
    assert entry.origin == "built-in"
    module, _, name = entry.target.partition(":")  # a family's package re-exports its base, defined in a submodule
    assert getattr(importlib.import_module(module), name) is BUILTIN_CLASSES[tag]
    assert registry.get(tag) is BUILTIN_CLASSES[tag]


def test_empty_site_has_exactly_the_builtins(site: PluginSite) -> None:
    registry = site.load()
    assert [e.type for e in registry.entries] == ["prune", "quantize", "distill", "deploy"]
    assert registry.types() == ["deploy", "distill", "prune", "quantize"]
    assert registry.stage_classes() == [PruneStage, QuantizeStage, DistillStage, DeployStage]


# --- a working plugin ------------------------------------------------------------------------


def test_working_plugin_is_registered_with_its_distribution(site: PluginSite) -> None:
    module = site.stage_module("acme_shrink", "shrink", cls="ShrinkStage")
    site.dist("acme-stages", "1.2.3", {"shrink": f"{module}:ShrinkStage"})
    registry = site.load()

    entry = only_entry(registry, "shrink")
    assert entry.ok and entry.error is None
    assert entry.origin == "acme-stages 1.2.3"
    assert entry.target == f"{module}:ShrinkStage"
    assert registry.types() == ["deploy", "distill", "prune", "quantize", "shrink"]
    assert [e.type for e in registry.entries][:4] == ["prune", "quantize", "distill", "deploy"]

    cls = registry.get("shrink")
    assert cls is sys.modules[module].ShrinkStage
    assert issubclass(cls, Stage)
    stage = cls.model_validate({"type": "shrink", "level": 3})
    model = nn.Linear(4, 2)
    ctx = make_context(model)
    assert stage.apply(model, ctx) is model
    assert ctx.metrics == {"level": 3}


def test_nested_attribute_target_is_followed(site: PluginSite) -> None:
    source = STAGE_SOURCE.format(cls="Inner", tag="nested") + "\n\nclass Outer:\n    Stage = Inner\n"
    module = site.module("acme_nested", source)
    site.dist("acme-nested", "0.1", {"nested": f"{module}:Outer.Stage"})
    assert site.load().get("nested").__name__ == "Inner"


def test_plugins_of_several_distributions_are_all_loaded(site: PluginSite) -> None:
    first = site.stage_module("acme_a", "alpha")
    second = site.stage_module("acme_b", "beta")
    site.dist("acme-a", "1.0", {"alpha": f"{first}:PluginStage"})
    site.dist("acme-b", "2.0", {"beta": f"{second}:PluginStage"})
    registry = site.load()
    assert only_entry(registry, "alpha").origin == "acme-a 1.0"
    assert only_entry(registry, "beta").origin == "acme-b 2.0"
    assert registry.types() == ["alpha", "beta", "deploy", "distill", "prune", "quantize"]


# --- broken plugins --------------------------------------------------------------------------

IMPORT_FAILURES = [
    # (module source, or None for no module file at all; exception name expected in the reason)
    (None, "ModuleNotFoundError"),
    ("import torchslim_dependency_that_is_not_installed\n", "ModuleNotFoundError"),
    ("raise ImportError('needs libfoo 2')\n", "ImportError"),
    ("from torchslim import NoSuchName\n", "ImportError"),
    ("raise RuntimeError('CUDA driver missing')\n", "RuntimeError"),
    ("def broken(:\n", "SyntaxError"),
]
IMPORT_FAILURE_IDS = ["missing-module", "missing-dependency", "import-error", "bad-import-name", "runtime-error", "syntax-error"]


@pytest.mark.parametrize(("source", "exception"), IMPORT_FAILURES, ids=IMPORT_FAILURE_IDS)
def test_plugin_that_fails_to_import_is_broken_not_fatal(site: PluginSite, source: str | None, exception: str) -> None:
    module = f"acme_absent_{site.suffix}" if source is None else site.module("acme_bad", source)
    target = f"{module}:BadStage"
    good = site.stage_module("acme_good", "good")
    site.dist("acme-stages", "1.0", {"bad": target, "good": f"{good}:PluginStage"})
    registry = site.load()

    entry = only_entry(registry, "bad")
    assert not entry.ok and entry.cls is None
    assert entry.origin == "acme-stages 1.0"
    assert entry.error is not None
    assert entry.error.startswith(f"import failed: {exception}: ")
    if source is None:
        assert f"acme_absent_{site.suffix}" in entry.error
    assert "bad" not in registry.types()
    assert "bad" not in [cls.model_fields["type"].default for cls in registry.stage_classes()]

    # Other stages, built-in or from the same distribution, still work.
    assert registry.get("prune") is PruneStage
    assert registry.get("good").__module__ == good
    with pytest.raises(PluginError, match="broken") as caught:
        registry.get("bad")
    assert "stage type 'bad'" in str(caught.value)
    assert "acme-stages 1.0" in str(caught.value)
    assert exception in str(caught.value)


NOT_STAGES = [
    ("class NotStage:\n    type = 'odd'\n", "NotStage"),
    ("def make_stage():\n    return None\n", "make_stage"),
    ("from pydantic import BaseModel\n\nclass Config(BaseModel):\n    type: str = 'odd'\n", "Config"),
    ("from torchslim import Context as Ctx\n", "Ctx"),
    ("VALUE = 42\n", "VALUE"),
]


@pytest.mark.parametrize(
    ("source", "attr"), NOT_STAGES, ids=["plain-class", "function", "pydantic-model", "other-torchslim-class", "constant"]
)
def test_entry_point_to_non_stage_is_broken(site: PluginSite, source: str, attr: str) -> None:
    module = site.module("acme_odd", source)
    site.dist("acme-odd", "0.3", {"odd": f"{module}:{attr}"})
    registry = site.load()

    entry = only_entry(registry, "odd")
    assert not entry.ok
    assert entry.error is not None and "is not a subclass of torchslim.Stage" in entry.error
    assert registry.get("quantize") is QuantizeStage
    with pytest.raises(PluginError, match="broken"):
        registry.get("odd")


def test_entry_point_to_missing_attribute_is_broken(site: PluginSite) -> None:
    module = site.stage_module("acme_attr", "attr")
    site.dist("acme-attr", "0.1", {"attr": f"{module}:Misspelt"})
    entry = only_entry(site.load(), "attr")
    assert not entry.ok
    assert entry.error is not None and entry.error.startswith("import failed: AttributeError: ")
    assert "Misspelt" in entry.error


def test_tag_differing_from_entry_point_name_is_broken(site: PluginSite) -> None:
    module = site.stage_module("acme_tag", "shrink")
    site.dist("acme-tag", "1.0", {"squash": f"{module}:PluginStage"})
    registry = site.load()

    entry = only_entry(registry, "squash")
    assert not entry.ok and entry.cls is None
    assert entry.error == "its type tag is 'shrink', but it is registered under the entry-point name 'squash'"
    assert "squash" not in registry.types()
    assert "shrink" not in registry.types()
    with pytest.raises(PluginError, match="broken"):
        registry.get("squash")
    with pytest.raises(PluginError, match="unknown stage type 'shrink'"):
        registry.get("shrink")


NO_DEFAULT_TAG = """\
from typing import Literal

from torch import nn

from torchslim import Context, Stage


class PluginStage(Stage):
    \"\"\"A stage that does not give its type tag a default.\"\"\"
{annotation}
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model
"""


@pytest.mark.parametrize("annotation", ["", '    type: Literal["squash"]\n'], ids=["inherited-str", "literal-no-default"])
def test_stage_without_default_tag_is_broken(site: PluginSite, annotation: str) -> None:
    module = site.module("acme_notag", NO_DEFAULT_TAG.format(annotation=annotation))
    site.dist("acme-notag", "1.0", {"squash": f"{module}:PluginStage"})
    registry = site.load()

    entry = only_entry(registry, "squash")
    assert not entry.ok and entry.cls is None
    assert entry.error is not None and "'squash'" in entry.error
    with pytest.raises(PluginError, match="broken"):
        registry.get("squash")


ABSTRACT_STAGE = """\
from typing import Literal

from torchslim import Stage


class PluginStage(Stage):
    \"\"\"A stage that forgot to implement apply.\"\"\"

    type: Literal["hollow"] = "hollow"
"""


def test_stage_without_apply_is_broken(site: PluginSite) -> None:
    module = site.module("acme_hollow", ABSTRACT_STAGE)
    site.dist("acme-hollow", "1.0", {"hollow": f"{module}:PluginStage"})
    registry = site.load()

    entry = only_entry(registry, "hollow")
    assert not entry.ok
    assert entry.error is not None and "apply" in entry.error
    with pytest.raises(RecipeError, match="broken"):
        load_recipe(digits_recipe([{"type": "hollow"}]), registry)


def test_plugin_reusing_builtin_tag_is_broken_and_builtin_kept(site: PluginSite) -> None:
    module = site.stage_module("acme_prune", "prune", cls="FakePrune")
    site.dist("acme-prune", "9.9", {"prune": f"{module}:FakePrune"})
    registry = site.load()

    builtin, plugin = entries_for(registry, "prune")
    assert builtin.origin == "built-in" and builtin.ok
    assert plugin.origin == "acme-prune 9.9" and not plugin.ok and plugin.cls is None
    assert plugin.error == ("tag 'prune' is already provided by built-in (torchslim.plugins.prune:PruneStage)")
    assert registry.get("prune") is PruneStage
    assert registry.types().count("prune") == 1
    assert registry.stage_classes() == [PruneStage, QuantizeStage, DistillStage, DeployStage]


def test_two_plugins_with_one_tag_keep_the_first(site: PluginSite) -> None:
    first = site.stage_module("acme_one", "twin")
    second = site.stage_module("acme_two", "twin")
    site.dist("acme-one", "1.0", {"twin": f"{first}:PluginStage"})
    site.dist("acme-two", "2.0", {"twin": f"{second}:PluginStage"})
    registry = site.load()

    winner, loser = entries_for(registry, "twin")
    assert winner.ok and not loser.ok
    assert loser.error == f"tag 'twin' is already provided by {winner.origin} ({winner.target})"
    assert registry.get("twin") is winner.cls


def test_broken_entry_does_not_hide_a_later_working_one(site: PluginSite) -> None:
    good = site.stage_module("acme_fix", "fix")
    # Entry points are read in name order, so the broken distribution is met first.
    site.dist("acme-broken", "1.0", {"fix": f"acme_absent_{site.suffix}:Stage"})
    site.dist("acme-fixed", "1.1", {"fix": f"{good}:PluginStage"})
    registry = site.load()
    assert sorted(e.ok for e in entries_for(registry, "fix")) == [False, True]
    assert registry.get("fix").__module__ == good


# --- turning autoload off --------------------------------------------------------------------


@pytest.fixture
def site_with_plugin(site: PluginSite) -> PluginSite:
    """A folder with one working plugin, ``shrink``."""
    module = site.stage_module("acme_shrink", "shrink")
    site.dist("acme-stages", "1.0", {"shrink": f"{module}:PluginStage"})
    return site


@pytest.mark.parametrize("value", ["1", "true", "yes"], ids=["one", "true", "yes"])
def test_env_variable_disables_plugins(site_with_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    registry = site_with_plugin.load()
    assert [e.type for e in registry.entries] == ["prune", "quantize", "distill", "deploy"]
    assert all(e.origin == "built-in" for e in registry.entries)
    with pytest.raises(PluginError, match="unknown stage type 'shrink'"):
        registry.get("shrink")


@pytest.mark.parametrize("value", ["", "0"], ids=["empty", "zero"])
def test_env_variable_other_values_keep_plugins(
    site_with_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    assert "shrink" in site_with_plugin.load().types()


def test_autoload_false_loads_builtins_only(site_with_plugin: PluginSite) -> None:
    registry = site_with_plugin.load(autoload=False)
    assert [e.type for e in registry.entries] == ["prune", "quantize", "distill", "deploy"]
    assert registry.types() == ["deploy", "distill", "prune", "quantize"]


def test_explicit_autoload_overrides_env_variable(site_with_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "shrink" in site_with_plugin.load(autoload=True).types()


# --- messages and recipes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("with_plugin", "known"),
    [(False, "deploy, distill, prune, quantize"), (True, "deploy, distill, prune, quantize, shrink")],
    ids=["builtins-only", "with-plugin"],
)
def test_unknown_type_message_lists_known_types(site: PluginSite, with_plugin: bool, known: str) -> None:
    if with_plugin:
        module = site.stage_module("acme_shrink", "shrink")
        site.dist("acme-stages", "1.0", {"shrink": f"{module}:PluginStage"})
    registry = site.load()
    expected = f"unknown stage type 'sparsegpt'; known types: {known}"
    assert registry.unknown_message("sparsegpt") == expected
    with pytest.raises(PluginError) as caught:
        registry.get("sparsegpt")
    assert str(caught.value) == expected


def test_recipe_can_use_plugin_stage(site_with_plugin: PluginSite) -> None:
    registry = site_with_plugin.load()
    recipe = load_recipe(
        digits_recipe([{"type": "prune", "amount": 0.5}, {"type": "shrink", "name": "tiny", "level": 4}]), registry
    )
    prune, shrink = recipe.stage_list
    assert isinstance(prune, PruneStage)
    assert isinstance(shrink, registry.get("shrink"))
    assert (shrink.label, shrink.level) == ("tiny", 4)
    assert recipe.resolved()["stages"][1] == {"type": "shrink", "name": "tiny", "level": 4}


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"type": "sparsegpt"},
            "stages[0].type (sparsegpt): unknown stage type 'sparsegpt'; known types: deploy, distill, prune, quantize, shrink",
        ),
        ({"type": "shrink", "levle": 2}, "unknown field 'levle'; did you mean 'level'? shrink accepts: type, name, level"),
        ({"type": "shrink", "level": "high"}, "stages[0].level (shrink): Input should be a valid integer"),
    ],
    ids=["unknown-type", "unknown-plugin-field", "bad-plugin-value"],
)
def test_recipe_with_bad_stage_fails_with_recipe_error(
    site_with_plugin: PluginSite, stage: dict[str, object], message: str
) -> None:
    registry = site_with_plugin.load()
    with pytest.raises(RecipeError) as caught:
        load_recipe(digits_recipe([stage]), registry)
    assert message in str(caught.value)


def test_recipe_using_broken_plugin_names_the_breakage(site: PluginSite) -> None:
    site.dist("acme-broken", "1.0", {"shrink": f"acme_absent_{site.suffix}:Stage"})
    registry = site.load()
    with pytest.raises(RecipeError) as caught:
        load_recipe(digits_recipe([{"type": "shrink"}]), registry)
    text = str(caught.value)
    assert "stages[0].type (shrink): stage type 'shrink' comes from a plugin that is broken (acme-broken 1.0)" in text
    assert "ModuleNotFoundError" in text


def test_recipe_plugin_type_unknown_without_autoload(site_with_plugin: PluginSite) -> None:
    registry = site_with_plugin.load(autoload=False)
    with pytest.raises(RecipeError, match="unknown stage type 'shrink'; known types: deploy, distill, prune, quantize"):
        load_recipe(digits_recipe([{"type": "shrink"}]), registry)
