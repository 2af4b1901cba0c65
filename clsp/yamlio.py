"""Read a YAML configuration within fixed budgets, so a small hostile file cannot hang, exhaust memory or mislead.

``yaml.safe_load`` builds no objects from tags, but it still reads a file of any size, expands aliases without
limit (a 500-byte "billion laughs" file stands for hundreds of millions of values), recurses once per nesting
level (``RecursionError`` at a few thousand) and lets a repeated key silently replace the first one. The
loader below checks each budget while the document is composed, before any Python value is built:

- the file is at most ``MAX_BYTES`` and UTF-8 (another encoding is named with the offending byte's offset);
- at most ``MAX_ALIASES`` aliases, and at most ``MAX_NODES`` values once every alias is expanded;
- nesting at most ``MAX_DEPTH`` deep;
- no mapping repeats a key (``<<`` merges may still override merged keys, as YAML intends).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode

from clsp.errors import UserError, short

MAX_BYTES = 1 << 20
MAX_NODES = 20_000
MAX_ALIASES = 100
MAX_DEPTH = 50
_MERGE = "tag:yaml.org,2002:merge"


class _BudgetError(yaml.YAMLError):
    """A budget exceeded at a line of the document."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")


class BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that counts nodes (aliases expanded), aliases and depth while composing, and refuses
    duplicate keys while constructing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = self._aliases = self._depth = 0
        self._weight: dict[str, int] = {}  # anchor -> values its node stands for, aliases inside expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _BudgetError(line, f"more than {MAX_ALIASES} aliases (*name); write the values out")
            self._count(line, 1 if event.anchor is None else self._weight.get(event.anchor, 1))
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _BudgetError(line, f"nested more than {MAX_DEPTH} levels deep")
        before = self._nodes
        self._count(line, 1)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._weight[event.anchor] = self._nodes - before
        return node

    def _count(self, line: int, nodes: int) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise _BudgetError(line, f"more than {MAX_NODES} values (aliases expanded); a configuration is far "
                                     "smaller: check the file")

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if duplicate:
                    raise _BudgetError(key_node.start_mark.line + 1,
                                       f"duplicate key {short(key)} (the first would be silently replaced); "
                                       "keep one")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """The value of YAML ``text``, within the module's budgets; ``source`` names it in the one-line error."""
    try:
        return yaml.load(text, Loader=BoundedLoader)
    except _BudgetError as err:
        raise UserError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{source} is not valid YAML: {_first_line(err)}") from None


def read_yaml(path: str | Path) -> Any:
    """The value of the YAML file ``path``: its size is checked before it is read, its encoding before parsing."""
    from clsp.io import regular_file  # torch comes with clsp.io: imported only when a file is read

    path = Path(path)
    if path.exists():  # a named pipe would block the read forever
        regular_file(path, "configuration")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes, over the {MAX_BYTES}-byte limit of a "
                        "configuration; check that it is the right file")
    with open(path, "rb") as stream:
        data = stream.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:  # grew while being read
        raise UserError(f"{path} is over the {MAX_BYTES}-byte limit of a configuration; check that it is the "
                        "right file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        utf16 = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(f"{path} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start}{utf16}; "
                        "save it as UTF-8") from None
    return parse_yaml(text, str(path))


def _first_line(err: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where (its messages span several lines)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"line {mark.line + 1}: {problem}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__
