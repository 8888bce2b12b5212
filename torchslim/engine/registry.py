"""Stage registry: built-in stages and third-party stages from entry points, one mechanism.

A plugin that fails to import, is not a Stage, or whose tag differs from its entry-point
name is kept as a *broken* entry with the reason; it never stops other stages from working.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from .errors import PluginError
from .stage import Stage
from .words import close_name

GROUP = "torchslim.stages"
AUTOLOAD_ENV = "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN = "built-in"

#: Built-in stages, declared the same way an entry point is: tag -> "module:Class".
BUILTINS: dict[str, str] = {
    "prune": "torchslim.plugins.prune:PruneStage",
    "quantize": "torchslim.plugins.quantize:QuantizeStage",
    "distill": "torchslim.plugins.distill:DistillStage",
    "deploy": "torchslim.plugins.deploy:DeployStage",
}


def is_builtin(stage_class: builtins.type[Any]) -> bool:
    """True for the classes of torchslim's own stages (a family's method classes included), which come
    from the modules named in :data:`BUILTINS`: a failure of theirs is torchslim's, not a plugin author's."""
    module = stage_class.__module__
    packages = {target.partition(":")[0] for target in BUILTINS.values()}
    return any(module == package or module.startswith(package + ".") for package in packages)


@dataclass(frozen=True)
class StageEntry:
    """One registered stage type: where it comes from and its class, or why it is broken."""

    type: str
    origin: str
    """``built-in``, or ``distribution version`` of the package that provides it."""
    target: str
    """The ``module:Class`` it was loaded from."""
    cls: builtins.type[Stage] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the stage class loaded and is usable."""
        return self.cls is not None


class Registry:
    """The stage types available to recipes. Build one with :meth:`load`."""

    def __init__(self, entries: Iterable[StageEntry] = ()) -> None:
        self._entries: list[StageEntry] = []
        for entry in entries:
            self.add(entry)

    @classmethod
    def load(cls, *, autoload: bool | None = None, path: Sequence[str] | None = None) -> Registry:
        """Built-ins, then the entry points of installed packages (or of ``path``, for tests).

        ``autoload`` defaults to true unless ``TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD=1`` is set.
        """
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes")
        registry = cls(_load(tag, target, BUILTIN) for tag, target in BUILTINS.items())
        if autoload:
            for ep in _entry_points(path):
                registry.add(_load(ep.name, ep.value, _origin(ep)))
        return registry

    def add(self, entry: StageEntry) -> None:
        """Register ``entry``; a tag already taken turns the newcomer into a broken entry naming both."""
        holder = self._working(entry.type)
        if holder is not None and entry.ok:
            entry = StageEntry(
                entry.type,
                entry.origin,
                entry.target,
                error=f"tag '{entry.type}' is already provided by {holder.origin} ({holder.target})",
            )
        self._entries.append(entry)

    def _working(self, tag: str) -> StageEntry | None:
        return next((e for e in self._entries if e.type == tag and e.ok), None)

    @property
    def entries(self) -> list[StageEntry]:
        """Every entry, broken ones included, in registration order."""
        return list(self._entries)

    def stage_classes(self) -> list[type[Stage]]:
        """The usable stage classes, in registration order."""
        return [cls for cls in (e.cls for e in self._entries) if cls is not None]

    def types(self) -> list[str]:
        """The usable stage tags, sorted."""
        return sorted(e.type for e in self._entries if e.ok)

    def get(self, tag: str) -> type[Stage]:
        """The class registered for ``tag``; PluginError naming known types or the breakage."""
        entry = self._working(tag)
        if entry is not None and entry.cls is not None:
            return entry.cls
        raise PluginError(self.unknown_message(tag))

    def unknown_message(self, tag: str) -> str:
        """Why ``tag`` cannot be used, with the known types."""
        broken = [e for e in self._entries if e.type == tag and not e.ok]
        if broken:
            return f"stage type '{tag}' comes from a plugin that is broken ({broken[0].origin}): {broken[0].error}"
        guess = close_name(tag, self.types()).removeprefix("; ")
        return f"unknown stage type '{tag}'{f' ({guess})' if guess else ''}; known types: {', '.join(self.types())}"


def _entry_points(path: Sequence[str] | None) -> list[Any]:
    if path is None:
        return sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)
    found: list[Any] = []
    for dist in metadata.distributions(path=list(path)):
        found.extend(ep for ep in dist.entry_points if ep.group == GROUP)
    return sorted(found, key=lambda ep: ep.name)


def _origin(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def _load(tag: str, target: str, origin: str) -> StageEntry:
    try:
        obj = _import(target)
    except Exception as exc:  # a third-party import can fail in any way; record it, do not crash
        return StageEntry(tag, origin, target, error=f"import failed: {type(exc).__name__}: {exc}")
    problem = _check_class(tag, obj)
    if problem:
        return StageEntry(tag, origin, target, error=problem)
    return StageEntry(tag, origin, target, cls=obj)


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _check_class(tag: str, obj: Any) -> str | None:
    if not (isinstance(obj, type) and issubclass(obj, Stage)):
        return f"{obj!r} is not a subclass of torchslim.Stage"
    if obj.methods:
        return _check_family(tag, obj)
    if inspect.isabstract(obj):
        return f"{obj.__name__} does not implement {', '.join(sorted(obj.__abstractmethods__))}"
    field = obj.model_fields.get("type")
    if field is None or field.is_required():
        return f"its 'type' field has no default; declare type: Literal[{tag!r}] = {tag!r}"
    if field.default != tag:
        return f"its type tag is {field.default!r}, but it is registered under the entry-point name '{tag}'"
    return None


def _check_family(tag: str, family: type[Stage]) -> str | None:
    """A family's methods: concrete subclasses of it, each with its own ``method`` string literal."""
    tags = []
    for method in family.methods:
        if not issubclass(method, family) or method.methods:
            return f"its method class {method.__name__} must be a subclass of {family.__name__} and no family itself"
        field = method.model_fields.get("method")
        if field is None or not isinstance(field.default, str):
            return f"its method class {method.__name__} has no method tag; declare method: Literal['...'] = '...'"
        problem = _check_class(tag, method)
        if problem:
            return f"its method {field.default!r}: {problem}"
        tags.append(field.default)
    if len(set(tags)) != len(tags) or family.default_method not in tags:
        return f"its methods {tags} must be distinct and include its default_method {family.default_method!r}"
    return None
