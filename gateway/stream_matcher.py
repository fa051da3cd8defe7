"""The hold-back window that lets rules see streamed text before any of it leaves.

Owns `StreamMatcher` (feed text as it arrives, get back only text no rule can still claim,
flush at the end) and `settle`, the one function that applies matches to a text. Must not know
rules, policies or OpenAI payloads: a scan function says where matches are and how far the
text is safe.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

Effect = Literal["block", "redact", "pass"]
_CONTEXT = 8  # released characters rescanned so word boundaries still see their neighbour


class Match(Protocol):
    """A rule match: its span, whether more text could still change it, and its effect."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def final(self) -> bool: ...
    @property
    def effect(self) -> Effect: ...
    @property
    def replacement(self) -> str: ...


M = TypeVar("M", bound=Match)


@dataclass(slots=True)  # not frozen: measured, a frozen one costs ~3.5k instructions more to
class Scanned(Generic[M]):  # build (object.__setattr__ per field); a stream builds one per chunk
    """What a scan found in a text, and up to where no match that is not visible can start."""

    matches: Sequence[M]
    safe_end: int


@dataclass(slots=True)
class Release(Generic[M]):
    """Text that may leave now, the matches it settled, and the block that ends it, if any."""

    text: str = ""
    matches: list[M] = field(default_factory=list)
    blocked: M | None = None


def settle(
    text: str, matches: Sequence[M], boundary: int, *, final: bool
) -> tuple[int, Release[M]]:
    """Decides how much of `text` can go: up to `boundary`, less for undecided matches.

    Returns the number of characters consumed and the release (redactions applied).
    """
    cut = _cut(text, boundary, final=final)
    if not matches:  # the common case: nothing to order, cut or replace
        return cut, Release(text[:cut])
    for match in matches:
        if not (final or match.final):
            cut = min(cut, match.start)
    ordered = sorted((m for m in matches if final or m.final), key=lambda m: (m.start, -m.end))
    release: Release[M] = Release()
    taken: list[M] = []
    for match in ordered:
        if match.start >= cut:
            break
        if match.effect == "block":
            cut, release.blocked = match.start, match
            break
        if match.end > cut:
            cut = _before(taken, match.start)
            break
        taken.append(match)
    release.matches = [m for m in taken if m.start < cut]
    release.text = _redact(text[:cut], [m for m in release.matches if m.effect == "redact"])
    return cut, release


def _cut(text: str, boundary: int, *, final: bool) -> int:
    """How much of `text` may go when no match holds it back."""
    return len(text) if final else max(0, min(boundary, len(text)))


def _before(taken: Sequence[Match], cut: int) -> int:
    """`cut`, moved back before any taken match it would split (overlapping matches)."""
    while inside := [m.start for m in taken if m.start < cut < m.end]:
        cut = min(inside)
    return cut


def _redact(text: str, matches: Sequence[Match]) -> str:
    """Replaces each match span (overlapping spans merge under the first replacement)."""
    pieces: list[str] = []
    position = 0
    for match in sorted(matches, key=lambda m: m.start):
        if match.end <= position:
            continue
        start = max(match.start, position)
        pieces.append(text[position:start])
        if start == match.start:
            pieces.append(match.replacement)
        position = match.end
    pieces.append(text[position:])
    return "".join(pieces)


Scan = Callable[[str, int], Awaitable[Scanned[M]]]
"""scan(text, fresh): matches and safe end of `text`, whose part before `fresh` was released."""


class StreamMatcher(Generic[M]):
    """Holds back streamed text only as long as a match could still be forming in it.

    `feed` returns what may be sent now; `finish` flushes the rest. After a block, nothing more
    is released.
    """

    def __init__(self, scan: Scan[M]) -> None:
        self._scan = scan
        self._context = ""
        self._pending = ""
        self._blocked = False

    @property
    def held(self) -> int:
        """Characters received but not yet released."""
        return len(self._pending)

    async def feed(self, text: str) -> Release[M]:
        if self._blocked:
            return Release()
        self._pending += text
        return await self._release(final=False)

    async def finish(self) -> Release[M]:
        if self._blocked or not self._pending:
            return Release()
        return await self._release(final=True)

    async def _release(self, *, final: bool) -> Release[M]:
        offset = len(self._context)
        scanned = await self._scan(self._context + self._pending, offset)
        if scanned.matches:
            consumed, release = self._settle(scanned, offset, final=final)
        else:  # the usual chunk: what `settle` answers for no match, without its call
            consumed = _cut(self._pending, scanned.safe_end - offset, final=final)
            release = Release(self._pending[:consumed])
        self._context = (self._context + self._pending[:consumed])[-_CONTEXT:]
        self._pending = self._pending[consumed:]
        return release

    def _settle(self, scanned: Scanned[M], offset: int, *, final: bool) -> tuple[int, Release[M]]:
        matches = [_Shifted(m, offset) for m in scanned.matches if m.start >= offset]
        consumed, shifted = settle(self._pending, matches, scanned.safe_end - offset, final=final)
        release: Release[M] = Release(shifted.text, [m.inner for m in shifted.matches])
        if shifted.blocked is not None:
            release.blocked = shifted.blocked.inner
            self._blocked = True
        return consumed, release


@dataclass(frozen=True, slots=True)
class _Shifted(Generic[M]):
    """A match moved into the pending text's coordinates."""

    inner: M
    offset: int

    @property
    def start(self) -> int:
        return self.inner.start - self.offset

    @property
    def end(self) -> int:
        return self.inner.end - self.offset

    @property
    def final(self) -> bool:
        return self.inner.final

    @property
    def effect(self) -> Effect:
        return self.inner.effect

    @property
    def replacement(self) -> str:
        return self.inner.replacement
