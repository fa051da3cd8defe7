"""Compiled text rules: normalisation, one RE2 set per direction, and injection heuristics.

Owns turning regex and word rules into one `re2.Set` pass (plus a per-rule search only for the
rules that hit), mapping matches back to the caller's text, the longest possible match of each
rule, and prompt-injection scoring. Must not know policies' scope, modes or the request path.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

import re2

RuleKey = tuple[str, str]
"""(policy id, rule id)."""

_WORD_CHAR = r"\pL\pN_"
_SPACE = r"\s{1,8}"
_UNBOUNDED = 65536
_MAX_MEM = 128 << 20
_HIDDEN = re2.compile(r"[\x{200B}-\x{200F}\x{2060}-\x{2064}\x{FEFF}\x{E0000}-\x{E007F}]")
_TAGS = re2.compile(r"[\x{E0020}-\x{E007E}]+")
_BASE64 = re2.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_HEX = re2.compile(r"(?:[0-9a-fA-F]{2}){8,}")


def re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = _MAX_MEM
    return options


def check_pattern(pattern: str) -> str | None:
    """Why RE2 cannot run `pattern`, or None when it can."""
    try:
        re2.compile(pattern, options=re2_options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid pattern"
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    return None


def pattern_width(pattern: str) -> int | None:
    """The longest text `pattern` can match, or None when unbounded or unknown."""
    try:
        widest = int(sre_parse.parse(pattern).getwidth()[1])
    except (re.error, ValueError, TypeError, OverflowError):  # RE2 syntax Python lacks
        return None
    return widest if widest < _UNBOUNDED else None


def fold(text: str) -> str:
    """Compatibility-decomposes and drops combining marks and invisible format characters."""
    return "".join(_fold_char(c) for c in text)


def _fold_char(char: str) -> str:
    if unicodedata.category(char) in ("Mn", "Cf"):
        return ""
    decomposed = unicodedata.normalize("NFKD", char)
    return "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Cf"))


@dataclass(frozen=True, slots=True)
class Normalised:
    """Folded text and the map from its characters back to the original's."""

    text: str
    original_length: int
    origin: tuple[int, ...] | None = None  # None: identical to the original

    def span(self, start: int, end: int) -> tuple[int, int]:
        if self.origin is None:
            return start, end
        if end <= start:
            at = self.index(start)
            return at, at
        return self.origin[start], self.index(end)  # trailing marks go with the match

    def index(self, position: int) -> int:
        if self.origin is None:
            return min(position, self.original_length)
        if position >= len(self.origin):
            return self.original_length
        return self.origin[max(0, position)]


def normalise(text: str) -> Normalised:
    """`text` as rules see it: NFKD-folded, without accents, zero-width or tag characters."""
    if text.isascii():
        return Normalised(text, len(text))
    chars: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        folded = _fold_char(char)
        chars.append(folded)
        origin.extend([index] * len(folded))
    return Normalised("".join(chars), len(text), tuple(origin))


def words_pattern(words: Sequence[str], *, case_sensitive: bool, whole_words: bool) -> str:
    """One RE2 pattern for a word list; with `whole_words`, group 1 is the word itself."""
    alternatives = sorted({_phrase(w) for w in words if fold(w).strip()}, key=len, reverse=True)
    body = "|".join(alternatives)
    flags = "" if case_sensitive else "(?i)"
    if not whole_words:
        return f"{flags}(?:{body})"
    return f"{flags}(?:^|[^{_WORD_CHAR}])({body})(?:[^{_WORD_CHAR}]|$)"


def words_width(words: Sequence[str], *, whole_words: bool) -> int:
    longest = max((len(fold(w).strip()) + 7 * fold(w).count(" ") for w in words), default=1)
    return longest + (2 if whole_words else 0)


def _phrase(word: str) -> str:
    return _SPACE.join(re2.escape(part) for part in fold(word).split())


@dataclass(frozen=True, slots=True)
class TextPattern:
    """One rule compiled for the set: `group` 1 when the match span is the first group."""

    key: RuleKey
    pattern: str
    width: int
    group: int = 0


@dataclass(frozen=True, slots=True)
class Hit:
    """A match in original-text coordinates; `reach` is where, in folded text, it may end."""

    key: RuleKey
    start: int
    end: int
    reach: int


@dataclass(frozen=True, slots=True)
class Scan:
    hits: tuple[Hit, ...]
    normalised: Normalised


class TextScanner:
    """All patterns of one direction behind one RE2 set: cost grows slowly with rule count."""

    def __init__(self, patterns: Sequence[TextPattern]) -> None:
        options = re2_options()
        self._patterns = tuple(patterns)
        self._compiled = tuple(re2.compile(p.pattern, options=options) for p in self._patterns)
        self._set = re2.Set.SearchSet(options)
        for item in self._patterns:
            self._set.Add(item.pattern)
        self._set.Compile()

    def __len__(self) -> int:
        return len(self._patterns)

    def scan(self, text: str) -> Scan:
        folded = normalise(text)
        hits: list[Hit] = []
        if not self._patterns:
            return Scan((), folded)
        for index in self._set.Match(folded.text) or ():
            hits.extend(self._hits(index, folded))
        return Scan(tuple(hits), folded)

    def _hits(self, index: int, folded: Normalised) -> Iterable[Hit]:
        item, regex = self._patterns[index], self._compiled[index]
        position = 0
        while position <= len(folded.text):
            found = regex.search(folded.text, position)
            if found is None:
                return
            start, end = found.span(item.group)
            whole_start, whole_end = found.span()
            begin, finish = folded.span(start, end)
            yield Hit(item.key, begin, finish, whole_start + item.width)
            position = max(end, whole_start + 1) if item.group else max(whole_end, start + 1)


@dataclass(frozen=True, slots=True)
class InjectionSignals:
    """Compiled heuristics of one injection rule."""

    override: Any | None
    roleplay: Any | None
    weights: tuple[float, float, float, float]  # override, roleplay, hidden, encoded
    min_hidden: int


def compile_injection(
    override: Sequence[str], roleplay: Sequence[str], weights: tuple[float, float, float, float],
    min_hidden: int,
) -> InjectionSignals:  # fmt: skip
    options = re2_options()

    def build(words: Sequence[str]) -> Any | None:
        if not words:
            return None
        return re2.compile(words_pattern(words, case_sensitive=False, whole_words=True), options)

    return InjectionSignals(build(override), build(roleplay), weights, min_hidden)


def injection_score(text: str, signals: InjectionSignals) -> tuple[float, list[str]]:
    """The score of `text` and the names of the signals found."""
    folded = normalise(text).text
    found: list[str] = []
    if signals.override is not None and signals.override.search(folded):
        found.append("override_phrase")
    if signals.roleplay is not None and signals.roleplay.search(folded):
        found.append("roleplay_marker")
    if len(_HIDDEN.findall(text)) >= signals.min_hidden:
        found.append("hidden_text")
    if _has_encoded_phrase(text, signals):
        found.append("encoded_payload")
    weights = dict(zip(("override_phrase", "roleplay_marker", "hidden_text", "encoded_payload"),
                       signals.weights, strict=True))  # fmt: skip
    return sum(weights[name] for name in found), found


def _has_encoded_phrase(text: str, signals: InjectionSignals) -> bool:
    for decoded in _decoded_payloads(text):
        folded = normalise(decoded).text
        for regex in (signals.override, signals.roleplay):
            if regex is not None and regex.search(folded):
                return True
    return False


def _decoded_payloads(text: str) -> Iterable[str]:
    """Text hidden as Unicode tag characters, base64 or hex."""
    for found in _TAGS.finditer(text):
        yield "".join(chr(ord(c) - 0xE0000) for c in found.group())
    for found in _BASE64.finditer(text):
        value = found.group()
        try:
            raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        yield raw.decode("utf-8", errors="ignore")
    for found in _HEX.finditer(text):
        yield bytes.fromhex(found.group()).decode("utf-8", errors="ignore")
