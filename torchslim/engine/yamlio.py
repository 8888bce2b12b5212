"""Safe YAML reading that remembers where every value came from.

Validation errors are reported as ``file:line:col``, so the loader keeps a map from
each value's path (``("stages", 2, "dtype")``) to its position in the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

#: Above this many nodes after alias expansion a document is refused: a few nested
#: aliases (a "billion laughs" file) otherwise expand to billions of values.
MAX_EXPANDED_NODES = 100_000

#: Positions are recorded this deep at most; recipes are a handful of levels deep.
MAX_DEPTH = 64

Position = tuple[int, int]


@dataclass(frozen=True)
class Document:
    """A parsed YAML document: its data, its file, and the position of each value."""

    data: Any
    source: str
    positions: dict[tuple[Any, ...], Position] = field(default_factory=dict)

    def position(self, path: tuple[Any, ...]) -> tuple[Position | None, tuple[Any, ...]]:
        """Return the position of the longest prefix of ``path`` found in the file, and that prefix."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.positions:
                return self.positions[path[:end]], path[:end]
        return None, ()

    def where(self, path: tuple[Any, ...]) -> str:
        """``file:line:col`` of the value at ``path`` (or of its nearest parent)."""
        pos, _ = self.position(path)
        return f"{self.source}:{pos[0]}:{pos[1]}" if pos else self.source


def read_yaml(path: str | os.PathLike[str]) -> Document:
    """Read a YAML file with the safe loader; raise RecipeError with a position on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{source}: cannot read file: {exc}") from None
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str = "<string>") -> Document:
    """Parse YAML text; ``source`` names it in error messages."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError(f"{source}: the file is empty; expected a mapping of recipe fields")
        _check_expansion(node, source)
        _check_duplicates(node, source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise RecipeError(_yaml_message(exc, source)) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    positions: dict[tuple[Any, ...], Position] = {}
    _record(node, (), positions)
    return Document(data, source, positions)


def _yaml_message(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = exc.problem or "invalid YAML"
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        problem += " (recipes are read with a safe loader: Python object tags are not allowed)"
    return f"{where}: {problem}"


def _check_expansion(root: yaml.Node, source: str) -> None:
    # Aliases make the node graph a DAG; count its size as a tree, memoised per node,
    # so a bomb is measured in microseconds instead of being expanded.
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # guards against recursive aliases while counting
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        sizes[id(node)] = total
        return total

    if size(root) > MAX_EXPANDED_NODES:
        mark = root.start_mark
        raise RecipeError(
            f"{source}:{mark.line + 1}:{mark.column + 1}: the document expands to more than "
            f"{MAX_EXPANDED_NODES} values through anchors and aliases; refusing to load it"
        )


def _check_duplicates(root: yaml.Node, source: str) -> None:
    # PyYAML keeps the last of two equal keys in silence: a second "stages:" would drop the first list.
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:  # aliases share nodes; each is checked once
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            _duplicate_keys(node, source)
            stack.extend(child for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _duplicate_keys(node: yaml.MappingNode, source: str) -> None:
    first: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        # A merge key (<<) may repeat, and keys it brings in may be overridden: YAML allows both.
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = _scalar_key(key_node)
        if key in first:
            was = first[key].start_mark
            mark = key_node.start_mark
            raise RecipeError(
                f"{source}:{mark.line + 1}:{mark.column + 1}: duplicate key '{key_node.value}' "
                f"(first at {source}:{was.line + 1}:{was.column + 1}); a mapping holds each key once, "
                "and YAML would keep only the last"
            )
        first[key] = key_node


def _record(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], Position]) -> None:
    if len(path) > MAX_DEPTH:  # a recursive alias would otherwise never end
        return
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                _record(value_node, path + (_scalar_key(key_node),), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            _record(child, path + (index,), out)


def _scalar_key(node: yaml.ScalarNode) -> Any:
    # Keys are compared with the constructed data's keys: resolve ints and bools the same way.
    if node.tag == "tag:yaml.org,2002:int":
        try:
            return int(node.value)
        except ValueError:
            return node.value
    return node.value


def dump_yaml(data: Any) -> str:
    """Serialise plain data as block-style YAML, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
