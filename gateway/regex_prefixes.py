"""Patterns for the prefixes of a regular expression's matches.

Owns deriving, from a pattern, a pattern that matches every non-empty prefix of every one of its
matches (a prefix of R1 R2 is one of R1, or R1 then one of R2; an assertion past the end of the
text is unknown, so it may hold). The pattern is parsed with Python's parser and re-emitted in
RE2 syntax with the same meaning. Must not compile or run patterns (`gateway.scanner` does).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

Piece = tuple[str, str | None]
"""(pattern, pattern of its non-empty prefixes); None when it has none (it matches only "")."""

NEVER = r"[^\x00-\x{10ffff}]"
"""A pattern that matches nothing: the prefixes of a pattern that only matches ""."""

_ANCHORS = {"AT_BEGINNING": "^", "AT_BEGINNING_STRING": r"\A", "AT_END": "$",
            "AT_BOUNDARY": r"\b", "AT_NON_BOUNDARY": r"\B"}  # fmt: skip
_CATEGORIES = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s",
               "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_WORD": r"\w",
               "CATEGORY_NOT_WORD": r"\W"}  # fmt: skip
_FLAGS = {re.IGNORECASE: "i", re.MULTILINE: "m", re.DOTALL: "s"}
_IGNORED_FLAGS = re.UNICODE | re.VERBOSE
_DIVERGENT = ("[:", "{,")  # POSIX classes and `{,n}`: Python and RE2 read them differently


class _Unsupported(Exception):
    """A construct the derivation does not know: the rule falls back to its width."""


def prefixes_pattern(pattern: str) -> str | None:
    """A pattern for every non-empty prefix of every match of `pattern`; None if unknown.

    RE2-only syntax (such as `\\pL`) gives None, as does anything Python and RE2 read apart.
    """
    if any(mark in pattern for mark in _DIVERGENT):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            parsed = sre_parse.parse(pattern)
        flags = _flag_text(parsed.state.flags & ~_IGNORED_FLAGS, 0)
        prefixes = _sequence(parsed.data)[1]
    except (re.error, Warning, _Unsupported, RecursionError, ValueError):
        return None
    if prefixes is None:
        return NEVER
    return f"(?{flags}:{prefixes})" if flags else prefixes


def _sequence(items: Sequence[tuple[Any, Any]]) -> Piece:
    return chain([_piece(op, value) for op, value in items])


def chain(pieces: Sequence[Piece]) -> Piece:
    """A sequence: a non-empty prefix is one of its first piece, or it and one of the rest."""
    rest: str | None = None
    for exact, prefixes in reversed(pieces):
        after = f"{exact}(?:{rest})" if rest is not None else None
        rest = _either([prefixes, after])
    return "".join(e for e, _ in pieces), rest


def _either(options: Sequence[str | None]) -> str | None:
    known = [o for o in options if o is not None]
    if not known:
        return None
    return known[0] if len(known) == 1 else "(?:" + "|".join(known) + ")"


def _piece(op: Any, value: Any) -> Piece:
    name = str(op)
    if name == "LITERAL":
        return literal(value), literal(value)
    if name == "NOT_LITERAL":
        return f"[^{literal(value)}]", f"[^{literal(value)}]"
    if name == "ANY":
        return ".", "."
    if name == "IN":
        return _class(value), _class(value)
    if name == "AT" and str(value) in _ANCHORS:
        return _ANCHORS[str(value)], None
    if name == "BRANCH":
        alternatives = [_sequence(items) for items in value[1]]
        exact = "(?:" + "|".join(e for e, _ in alternatives) + ")"
        return exact, _either([p for _, p in alternatives])
    if name == "SUBPATTERN":
        _, on, off, items = value
        exact, prefixes = _sequence(items)
        head = f"(?{_flag_text(on, off)}:" if on or off else "(?:"
        return f"{head}{exact})", f"{head}{prefixes})" if prefixes is not None else None
    if name in ("MAX_REPEAT", "MIN_REPEAT"):
        return _repeat(*value)
    raise _Unsupported(name)


def _repeat(low: int, high: Any, items: Sequence[tuple[Any, Any]]) -> Piece:
    """body{low,high}: a non-empty prefix is up to high-1 whole bodies, then one of a body."""
    exact, prefixes = _sequence(items)
    unbounded = high is sre_parse.MAXREPEAT
    pattern = f"(?:{exact}){{{low},{'' if unbounded else high}}}"
    if prefixes is None or high == 0:
        return pattern, None
    if unbounded:
        return pattern, f"(?:{exact})*(?:{prefixes})"
    return pattern, f"(?:{exact}){{0,{high - 1}}}(?:{prefixes})" if high > 1 else prefixes


def _class(items: Sequence[tuple[Any, Any]]) -> str:
    parts = []
    for op, value in items:
        name = str(op)
        if name == "NEGATE":
            parts.append("^")
        elif name == "LITERAL":
            parts.append(literal(value))
        elif name == "RANGE":
            parts.append(f"{literal(value[0])}-{literal(value[1])}")
        elif name == "CATEGORY" and str(value) in _CATEGORIES:
            parts.append(_CATEGORIES[str(value)])
        else:
            raise _Unsupported(name)
    return "[" + "".join(parts) + "]"


def literal(code: int) -> str:
    return f"\\x{{{code:x}}}"


def _flag_text(on: int, off: int) -> str:
    if (on | off) & ~(sum(_FLAGS) | _IGNORED_FLAGS):
        raise _Unsupported("flags")
    text = "".join(c for flag, c in _FLAGS.items() if on & flag)
    negated = "".join(c for flag, c in _FLAGS.items() if off & flag)
    return text + ("-" + negated if negated else "")
