"""StreamMatcher: no byte of a match leaves, whatever the chunk boundaries."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from gateway.stream_matcher import Scanned, StreamMatcher, settle


@dataclass(frozen=True)
class FakeMatch:
    start: int
    end: int
    final: bool
    effect: str
    replacement: str = "#"


def literal_scanner(words: dict[str, str]):
    """A scan function for literal words: effect by word, hold = longest word."""
    hold = max(len(w) for w in words)

    async def scan(text: str, fresh: int = 0) -> Scanned[FakeMatch]:
        found = [
            FakeMatch(m.start(), m.end(), m.start() + hold <= len(text), effect)
            for word, effect in words.items()
            for m in re.finditer(re.escape(word), text)
        ]
        return Scanned(found, len(text) - hold + 1)

    return scan


async def run(scan, chunks: list[str]):
    matcher = StreamMatcher(scan)
    out, blocked = "", None
    for chunk in chunks:
        release = await matcher.feed(chunk)
        out += release.text
        blocked = blocked or release.blocked
    release = await matcher.finish()
    return out + release.text, blocked or release.blocked


def splits(text: str):
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    for a in range(1, len(text)):
        for b in range(a + 1, len(text)):
            yield [text[:a], text[a:b], text[b:]]


async def test_blocked_word_never_leaks_at_any_boundary():
    scan = literal_scanner({"secret": "block"})
    text = "say the secret word"
    for chunks in splits(text):
        out, blocked = await run(scan, chunks)
        assert out == "say the ", chunks
        assert blocked is not None


async def test_redacted_word_is_replaced_at_any_boundary():
    scan = literal_scanner({"secret": "redact"})
    text = "a secret, another secret."
    for chunks in splits(text):
        out, blocked = await run(scan, chunks)
        assert out == "a #, another #.", chunks
        assert blocked is None


async def test_clean_text_passes_unchanged_and_is_held_no_longer_than_needed():
    scan = literal_scanner({"secret": "block"})
    matcher = StreamMatcher(scan)
    release = await matcher.feed("hello world, nothing here")
    assert release.text == "hello world, nothing"  # the last len("secret") - 1 chars wait
    assert matcher.held == 5
    assert (await matcher.finish()).text == " here"


async def test_passing_matches_are_reported_once_and_not_changed():
    scan = literal_scanner({"note": "pass"})
    out, _ = await run(scan, ["a no", "te b note"])
    assert out == "a note b note"


async def test_nothing_is_released_after_a_block():
    scan = literal_scanner({"stop": "block"})
    matcher = StreamMatcher(scan)
    await matcher.feed("x stop y and more text")
    assert (await matcher.feed("further")).text == ""
    assert (await matcher.finish()).text == ""


@pytest.mark.parametrize(
    ("matches", "boundary", "expected"),
    [
        ([], 5, "hello"),
        ([], 0, ""),
        ([], -2, ""),
        ([], 99, "hello world"),
        ([FakeMatch(3, 6, False, "block")], 8, "hel"),
        ([FakeMatch(1, 3, True, "redact")], 8, "h#lo wo"),
        ([FakeMatch(4, 9, True, "redact")], 6, "hell"),
        # a straddling match that overlaps a settled one moves the cut before both
        ([FakeMatch(1, 4, True, "redact"), FakeMatch(2, 9, True, "redact")], 6, "h"),
    ],
)
def test_settle_cuts_before_undecided_and_straddling_matches(matches, boundary, expected):
    consumed, release = settle("hello world", matches, boundary, final=False)
    assert release.text == expected


@pytest.mark.parametrize("boundary", [-1, 0, 4, 11, 50])
def test_settling_no_match_releases_up_to_the_boundary_or_all_when_final(boundary):
    for final in (False, True):
        consumed, release = settle("hello world", [], boundary, final=final)
        expected = "hello world" if final else "hello world"[: max(0, boundary)]
        assert (consumed, release.text) == (len(expected), expected)
        assert release.matches == [] and release.blocked is None
