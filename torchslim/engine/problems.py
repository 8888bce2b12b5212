"""A failed recipe validation in words: each problem located (``file:line:col``) and said plainly.

Pydantic's errors name union members and regexes; these lines name the recipe's own fields, the
stage type, the known alternatives, and a close name when a key is mistyped.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import PluginError
from .registry import Registry
from .stage import Stage
from .words import close_name, one_of
from .yamlio import Document


def tag_of(cls: type[Stage], field: str) -> str:
    """The literal default of a stage class's ``type`` or ``method`` field."""
    return str(cls.model_fields[field].default)


def validation_problems(document: Document, exc: ValidationError, registry: Registry, model: type[BaseModel]) -> list[str]:
    """One line per problem of a failed validation: ``file:line:col: field.path (stage type): message``."""
    # A value that fits no member of a union (teacher: "original" or a model spec) gives one
    # error per member at the same path: merge them into one line.
    merged: dict[str, list[str]] = {}
    for err in exc.errors():
        where, message = _problem(document, err, registry, model)
        if message not in merged.setdefault(where, []):
            merged[where].append(message)
    return [f"{where}: {'; or '.join(messages)}" for where, messages in merged.items()]


def _problem(document: Document, err: Any, registry: Registry, model: type[BaseModel]) -> tuple[str, str]:
    path = _data_path(document.data, err["loc"], keep_last=err["type"] in ("missing", "extra_forbidden"))
    stage_type = _stage_type(document.data, path)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid" and err["ctx"]["discriminator"] == "method()":
        message = _method_message(registry, stage_type, str(err["ctx"]["tag"]))
        path = path + ("method",)
    elif err["type"] == "union_tag_invalid":
        message = registry.unknown_message(str(err["ctx"]["tag"]))
        path = path + ("type",)
    elif err["type"] == "union_tag_not_found":
        message = f"missing 'type'; known types: {', '.join(registry.types())}"
    elif err["type"] == "extra_forbidden":
        message = _extra_message(document.data, path, registry, model)
    elif err["type"] == "missing":
        message = f"required field '{path[-1]}' is missing" if path else message
    elif err["type"] in ("less_than", "less_than_equal"):
        message += _percent_hint(err)
    label = format_path(path) + (f" ({stage_type})" if stage_type else "")
    return f"{document.where(path)}: {label or '<top level>'}", message


def _percent_hint(err: Any) -> str:
    """``amount: 70`` where a fraction is expected: most likely a percentage."""
    bound, value = err["ctx"].get("lt", err["ctx"].get("le")), err.get("input")
    if bound == 1 and isinstance(value, int | float) and 2 <= value <= 100:  # 1.5 is a slip, not a percentage
        return f" (a fraction of 1, not a percentage: {value / 100:g}?)"
    return ""


def _data_path(data: Any, loc: tuple[Any, ...], keep_last: bool) -> tuple[Any, ...]:
    # Pydantic inserts union members into loc ("stages", 2, "quantize", "dtype"); keep only
    # the steps that exist in the data, plus the final key of a missing or unknown field.
    path: list[Any] = []
    node = data
    for index, step in enumerate(loc):
        if _has_step(node, step):
            node = node[step]
        elif not (keep_last and index == len(loc) - 1):
            continue  # a union member, not a key of the data
        path.append(step)
    return tuple(path)


def _has_step(node: Any, step: Any) -> bool:
    if isinstance(node, Mapping):
        return step in node
    return isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)


def _stage_type(data: Any, path: tuple[Any, ...]) -> str | None:
    if len(path) >= 2 and path[0] == "stages" and isinstance(data, Mapping):
        stages = data.get("stages")
        if isinstance(stages, list) and isinstance(path[1], int) and path[1] < len(stages):
            stage = stages[path[1]]
            if isinstance(stage, Mapping) and isinstance(stage.get("type"), str):
                return str(stage["type"])
    return None


def _stage_class(data: Any, path: tuple[Any, ...], registry: Registry) -> type[Stage] | None:
    """The class validating the stage at ``path`` (for a family, the method's), if it is known."""
    stage_type = _stage_type(data, path)
    if stage_type is None:
        return None
    try:
        cls = registry.get(stage_type)
    except PluginError:
        return None
    if not cls.methods:
        return cls
    method = data["stages"][path[1]].get("method", cls.default_method)
    return next((m for m in cls.methods if tag_of(m, "method") == method), None)


def _extra_message(data: Any, path: tuple[Any, ...], registry: Registry, model: type[BaseModel]) -> str:
    option = path[-1]
    cls = _stage_class(data, path, registry) if len(path) == 3 else None
    if cls is None:
        return f"unknown field '{option}'{close_name(str(option), _known_fields(model, path))}"
    family = registry.get(cls.model_fields["type"].default)
    owners = [tag_of(m, "method") for m in family.methods if option in m.model_fields]
    if owners:
        return (
            f"'{option}' does not apply to method {tag_of(cls, 'method')}; it is an option of "
            f"{'method' if len(owners) == 1 else 'methods'} {one_of(owners)}"
        )
    hint = close_name(str(option), list(cls.model_fields)) or ";"
    return f"unknown field '{option}'{hint} {_stage_type(data, path)} accepts: {', '.join(cls.model_fields)}"


def _known_fields(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """The field names valid beside the unknown key at ``path`` (empty where not known), as a recipe spells
    them (a field's alias where it has one): the model's fields followed through ``path``."""
    node: Any = model
    for step in path[:-1]:
        node = _inner(node, step)
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return []
    return [info.alias or name for name, info in node.model_fields.items()]


def _inner(annotation: Any, step: Any) -> Any:
    """The type found one ``step`` inside ``annotation``: a model's field, a dict's value, a list's item;
    an optional type as the type itself; None where that is not one type."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(step))
        return _unwrapped(field.annotation) if field is not None else None
    args = get_args(annotation)
    if get_origin(annotation) is dict and len(args) == 2:
        return _unwrapped(args[1])
    if get_origin(annotation) is list and len(args) == 1:
        return _unwrapped(args[0])
    return None


def _unwrapped(annotation: Any) -> Any:
    members = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) else []
    return members[0] if len(members) == 1 else annotation


def _method_message(registry: Registry, stage_type: str | None, tag: str) -> str:
    family = registry.get(stage_type) if stage_type else None
    tags = [repr(tag_of(m, "method")) for m in family.methods] if family else []
    return f"Input should be {one_of(tags)}"


def format_path(path: tuple[Any, ...]) -> str:
    """``("stages", 2, "amount")`` -> ``stages[2].amount``."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text
