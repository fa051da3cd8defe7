"""Compiled text rules: normalisation, and one RE2 set pass per direction.

Owns turning regex and word rules into one `re2.Set` pass (plus a per-rule search only for the
rules that hit), mapping matches back to the caller's text, the longest possible match of each
rule, and where near the end of a text a match could still be starting (so a stream holds back
only that). Must not know policies' scope, modes or the request path, nor score prompt
injection (`gateway.injection` does, with the normalisation and word patterns from here).
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

import re2

from gateway.policy_schema import RegexRule, WordsRule
from gateway.regex_prefixes import NEVER, Piece, chain, literal, prefixes_pattern

RuleKey = tuple[str, str]
"""(policy id, rule id)."""

_WORD_CHAR = r"\pL\pN_"
_SPACE = r"\s{1,8}"
_UNBOUNDED = 65536
_MAX_MEM = 128 << 20
_OPENINGS = 256


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


@dataclass(slots=True)  # not frozen: see `Scan`
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

    def position(self, index: int) -> int:
        """The folded position of the original text's character `index`."""
        if self.origin is None:
            return min(index, len(self.text))
        return bisect.bisect_left(self.origin, index)


def searchable(text: str) -> str | bytes:
    """`text` as RE2 searches it fastest: ASCII as bytes, with the same positions.

    The RE2 wrapper encodes a `str` to UTF-8 and maps every offset back to characters on each
    call; ASCII bytes need neither, and UTF-8 bytes match exactly what the `str` would.
    """
    return text.encode("ascii") if text.isascii() else text


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
    """The longest whole match of a word list (each gap between words may be 8 spaces)."""
    parts = [fold(w).split() for w in words]
    longest = max((sum(map(len, p)) + 8 * (len(p) - 1) for p in parts if p), default=1)
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
    opening: str | None = None  # every prefix of a match (see `pattern_opening`); None: unknown


def rule_pattern(key: RuleKey, rule: RegexRule | WordsRule, hold_cap: int) -> TextPattern:
    """A regex or word rule compiled for the set; its width capped at `hold_cap` when unknown."""
    if isinstance(rule, WordsRule):
        pattern = words_pattern(rule.words, case_sensitive=rule.case_sensitive,
                                whole_words=rule.whole_words)  # fmt: skip
        width = words_width(rule.words, whole_words=rule.whole_words)
        opening = words_opening(rule.words, case_sensitive=rule.case_sensitive,
                                whole_words=rule.whole_words)  # fmt: skip
        return TextPattern(key, pattern, width, 1 if rule.whole_words else 0, opening)
    width = rule.max_match_chars or pattern_width(rule.pattern) or hold_cap
    width = min(width, max(hold_cap, rule.max_match_chars or 0))
    return TextPattern(key, rule.pattern, width, opening=pattern_opening(rule.pattern))


@dataclass(frozen=True, slots=True)
class Hit:
    """A match in original-text coordinates; `whole` is where, in folded text, it starts."""

    key: RuleKey
    start: int
    end: int
    whole: int


@dataclass(slots=True)  # not frozen: measured, a frozen one costs ~3.8k instructions more to
class Scan:  # build (object.__setattr__ per field), and a stream builds one per chunk
    """The hits in a text; `fresh` is where, in folded text, its not yet released part starts."""

    hits: tuple[Hit, ...]
    normalised: Normalised
    fresh: int = 0


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
        self._openings: dict[frozenset[str], Openings] = {}

    def __len__(self) -> int:
        return len(self._patterns)

    def scan(self, text: str, fresh: int = 0) -> Scan:
        """Matches from `fresh` on; the text before it is context (a word boundary's neighbour).

        Each rule's matches are searched left to right from `fresh`, as they were from the
        start of the whole text, so a match in the context cannot hide one that follows it.
        """
        if text.isascii():  # `normalise`, `position` and `searchable`, without their calls
            folded, start = Normalised(text, len(text)), min(fresh, len(text))
            subject: str | bytes = text.encode("ascii")
        else:
            folded = normalise(text)
            start, subject = folded.position(fresh), searchable(folded.text)
        if not self._patterns:
            return Scan((), folded, start)
        matched = self._set.Match(subject)
        if not matched:  # the usual text: no call further
            return Scan((), folded, start)
        return self._scanned(folded, subject, start, matched)

    def scan_matched(self, text: str, subject: bytes, matched: Sequence[int]) -> Scan:
        """`scan(text)` of an ASCII text (`subject` its bytes) whose set pass, `matched` (indices
        of `patterns`), was part of a caller's (`JointPass`)."""
        return self._scanned(Normalised(text, len(text)), subject, 0, matched)

    @property
    def patterns(self) -> tuple[TextPattern, ...]:
        return self._patterns

    def _scanned(
        self, folded: Normalised, subject: str | bytes, start: int, matched: Sequence[int] | None
    ) -> Scan:
        if not matched:
            return Scan((), folded, start)
        hits: list[Hit] = []
        for index in matched:
            hits.extend(self._hits(index, folded, subject, start))
        return Scan(tuple(hits), folded, start)

    def opening(self, scanned: Scan, policy_ids: frozenset[str]) -> int:
        """Where, in folded text, a match of these policies' patterns could still be starting."""
        openings = self._openings.get(policy_ids)
        if openings is None:
            if len(self._openings) >= _OPENINGS:
                self._openings.clear()
            chosen = [p for p in self._patterns if p.key[0] in policy_ids]
            openings = self._openings[policy_ids] = Openings(chosen)
        return openings.first(scanned.normalised.text, scanned.fresh)

    def _hits(
        self, index: int, folded: Normalised, subject: str | bytes, start: int
    ) -> Iterable[Hit]:
        item, regex = self._patterns[index], self._compiled[index]
        if not item.group:
            return _plain_hits(item.key, regex, folded, subject, start)
        return self._word_hits(item, regex, folded, subject, start)

    def _word_hits(
        self, item: TextPattern, regex: Any, folded: Normalised, subject: str | bytes, start: int
    ) -> Iterator[Hit]:
        position = max(0, start - item.group)  # a whole word's match begins at its separator
        while position <= len(subject):
            found = regex.search(subject, position)
            if found is None:
                return
            start, end = found.span(item.group)
            whole_start = found.start()
            begin, finish = folded.span(start, end)
            yield Hit(item.key, begin, finish, whole_start)
            position = max(end, whole_start + 1)


def _plain_hits(
    key: RuleKey, regex: Any, folded: Normalised, subject: str | bytes, start: int
) -> Iterator[Hit]:
    """Every match of a pattern whose whole match is the span, from `start`, in one pass.

    `finditer` resumes at a match's end (one further after an empty match), as a search per
    match would, but returns an empty match twice when it was not at the position searched
    from: the repeat is skipped.
    """
    previous = (-1, -1)
    for found in regex.finditer(subject, start):
        span = found.span()
        if span == previous and span[0] == span[1]:
            continue
        previous = span
        begin, finish = folded.span(*span)
        yield Hit(key, begin, finish, span[0])


class JointPass:
    """One RE2 set pass over an ASCII text for several lists of patterns (each list its own
    set elsewhere): which patterns of each list match, for the price of one pass."""

    def __init__(self, lists: Sequence[Sequence[str]]) -> None:
        self._set = re2.Set.SearchSet(re2_options())
        self._bounds: list[tuple[int, int]] = []
        for patterns in lists:
            start = self._bounds[-1][1] if self._bounds else 0
            for pattern in patterns:
                self._set.Add(pattern)
            self._bounds.append((start, start + len(patterns)))
        self._set.Compile()
        self._none = tuple(() for _ in lists)

    def match(self, subject: bytes) -> tuple[Sequence[int], ...]:
        """Per list, the indices (within it) of its patterns that match `subject`."""
        matched = self._set.Match(subject)
        if not matched:
            return self._none
        return tuple([i - start for i in matched if start <= i < end]
                     for start, end in self._bounds)  # fmt: skip


# --- where a match could still be starting -------------------------------------------------
#
# A stream may release text up to the first position from which the text so far is the start
# of some match. An opening is a pattern for every prefix of a rule's matches; anchored at the
# end of the text, the leftmost match of all openings together is that first position, found
# in one RE2 pass.


def pattern_opening(pattern: str) -> str | None:
    """Every non-empty prefix of a match of `pattern`, as RE2 pattern; None when unknown."""
    opening = prefixes_pattern(pattern)
    if opening is None or check_pattern(opening + r"\z") is not None:
        return None
    return opening


def words_opening(words: Sequence[str], *, case_sensitive: bool, whole_words: bool) -> str:
    """`pattern_opening` of `words_pattern(words, ...)`, built from the words themselves."""
    phrases = []
    for word in sorted({fold(w) for w in words if fold(w).strip()}):
        pieces: list[Piece] = []
        for index, part in enumerate(word.split()):
            pieces += [(_SPACE, _SPACE)] if index else []
            pieces += [(literal(ord(c)), literal(ord(c))) for c in part]
        phrases.append(chain(pieces))
    body = ("(?:" + "|".join(e for e, _ in phrases) + ")",
            "(?:" + "|".join(p or NEVER for _, p in phrases) + ")")  # fmt: skip
    edge = f"[^{_WORD_CHAR}]"
    opening = body[1]
    if whole_words:  # the separator alone need not wait: a rescan sees it as context
        opening = f"(?:^|{edge})" + (chain([body, (f"(?:{edge}|$)", edge)])[1] or NEVER)
    return opening if case_sensitive else f"(?i:{opening})"


class Openings:
    """Where, near the end of a folded text, a match of some pattern could still be starting.

    One RE2 set pass over the tail says which patterns have a match that may have begun in it;
    only those search for where. Looks back only as far as each pattern's width; a pattern
    without an opening falls back to it (a match could start at any of the last `width`).
    """

    def __init__(self, patterns: Sequence[TextPattern]) -> None:
        known = [p for p in patterns if p.opening is not None]
        self._blind = max((p.width for p in patterns if p.opening is None), default=0)
        self._reach = max((p.width for p in known), default=0)
        options = re2_options()
        self._regexes = tuple(re2.compile(f"(?:{p.opening})\\z", options) for p in known)
        self._widths = tuple(p.width for p in known)
        self._set = re2.Set.SearchSet(options)
        for regex in self._regexes:
            self._set.Add(regex.pattern)
        self._set.Compile()

    def first(self, text: str, fresh: int = 0) -> int:
        """The first position from which `text` could be the start of a match (len if none).

        Positions before `fresh` - 1 were released already, so no match can start there (the
        one before `fresh` may be the separator a whole word's match starts with).
        """
        size = len(text)
        # A match of the longest width ending exactly at the end may still fail its trailing
        # assertion, so the window is width positions, not width - 1.
        first = size - self._blind if self._blind else size
        begin = max(0, size - self._reach, fresh - 1)
        if not self._regexes or begin >= first:
            return max(0, first)
        context = 1 if begin else 0  # the character a word boundary at `begin` looks at
        rest = text[begin - context :]
        tail = rest.encode("ascii") if rest.isascii() else rest  # `searchable`, without its call
        for index in self._set.Match(tail) or ():
            since = max(0, size - self._widths[index] - begin) + context
            if begin - context + since >= first:
                continue  # this pattern cannot start a match earlier than one found already
            found = self._regexes[index].search(tail, since)
            if found is not None:
                first = min(first, begin - context + found.start())
        return max(0, first)
