"""Typed placeholders such as `<PERSON_1>`: how they look, and putting the originals back.

Owns the placeholder format, restoring issued placeholders in whole texts, JSON trees and tool
arguments, and `Holdback`, which restores a text that arrives in pieces (a placeholder may be
split across stream chunks). Must not know HTTP, stages or detection; standard library only.
"""

from __future__ import annotations

import json
import re
from typing import Any

PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*_\d+>")
_AROUND_PLACEHOLDERS = re.compile(f"({PLACEHOLDER.pattern})")
"""Splits a text into plain pieces and placeholders (at the odd positions)."""
_JSON_SPECIAL = re.compile(r'["\\\x00-\x1f]')
"""What `json.dumps(..., ensure_ascii=False)` escapes in a string: quote, backslash, controls."""
_CONTAINERS = (dict, list)
_SCALARS = frozenset({int, float, bool, type(None)})
"""JSON values with nothing to restore, skipped by exact type: `isinstance` is slow to say no."""


def placeholder(entity: str, number: int) -> str:
    return f"<{entity}_{number}>"


def json_escaped(table: dict[str, str]) -> dict[str, str]:
    """The same table with values escaped for use inside a JSON string (tool arguments);
    `table` itself when no value needs escaping (callers only read it)."""
    if _JSON_SPECIAL.search("".join(table.values())) is None:
        return table
    return {key: _escaped(value) for key, value in table.items()}


def _escaped(value: str) -> str:
    # Most values (addresses, numbers) hold nothing JSON escapes: skip the encoder for them.
    if _JSON_SPECIAL.search(value) is None:
        return value
    return json.dumps(value, ensure_ascii=False)[1:-1]


def restore_text(text: str, table: dict[str, str]) -> str:
    """Replaces the placeholders in `table`; others (e.g. invented by the model) stay."""
    if "<" not in text:
        return text
    # One pass, like `PLACEHOLDER.sub`, without a Python call per placeholder.
    pieces = _AROUND_PLACEHOLDERS.split(text)
    pieces[1::2] = [table.get(found, found) for found in pieces[1::2]]
    return "".join(pieces)


def restore_tree(node: Any, table: dict[str, str], escaped: dict[str, str] | None = None) -> Any:
    """Restores every string in a JSON tree; `arguments` strings get JSON-escaped values
    (`escaped`, or `json_escaped(table)` made when one holds a placeholder: most answers
    have no tool call)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if type(value) in _SCALARS:
                continue
            if isinstance(value, str):
                if "<" in value:
                    node[key] = restore_text(value, _table_for(key, table, escaped))
            elif isinstance(value, _CONTAINERS):
                restore_tree(value, table, escaped)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            if type(value) in _SCALARS:
                continue
            if isinstance(value, str):
                if "<" in value:
                    node[index] = restore_text(value, table)
            elif isinstance(value, _CONTAINERS):
                restore_tree(value, table, escaped)
    return node


def _table_for(key: str, table: dict[str, str], escaped: dict[str, str] | None) -> dict[str, str]:
    if key != "arguments":
        return table
    return json_escaped(table) if escaped is None else escaped


class Holdback:
    """Restores text fed piece by piece, holding back only a possible partial placeholder.

    `feed` returns the text that is safe to release; `flush` returns what is left at the end.
    """

    __slots__ = ("_prefixes", "_table", "_tail")

    def __init__(self, table: dict[str, str]) -> None:
        self._table = table
        self._prefixes = {key[:i] for key in table for i in range(1, len(key))}
        self._tail = ""

    def feed(self, text: str) -> str:
        buffer, self._tail = self._tail + text, ""
        out = []
        position = 0
        while (start := buffer.find("<", position)) != -1:
            out.append(buffer[position:start])
            match = PLACEHOLDER.match(buffer, start)
            if match:
                out.append(self._table.get(match.group(), match.group()))
                position = match.end()
                continue
            if buffer[start:] in self._prefixes:
                self._tail = buffer[start:]
                return "".join(out)
            out.append("<")
            position = start + 1
        out.append(buffer[position:])
        return "".join(out)

    def flush(self) -> str:
        tail, self._tail = self._tail, ""
        return tail
