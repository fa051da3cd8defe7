"""Prefix patterns: every non-empty prefix of a match matches; other text does not."""

from __future__ import annotations

import pytest
import re2

from gateway.regex_prefixes import NEVER, prefixes_pattern


def opens(pattern: str, text: str, at: int) -> bool:
    """Whether a match of `pattern` could start at `at` in `text` and still be forming."""
    prefixes = prefixes_pattern(pattern)
    assert prefixes is not None
    found = re2.compile(f"(?:{prefixes})\\z").search(text, at)
    return found is not None and found.start() == at


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        (r"\b(?:AK|AS)IA[0-9A-Z]{16}\b", "AK" + "IA" + "Q7" * 8),
        (r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,200}\b", "sk-" + "proj-" + "x" * 30),
        (r"-----BEGIN[A-Z ]{0,20}PRIVATE[ ]KEY-----", "-----BEGIN RSA " + "PRIVATE KEY-----"),
        (r"\b\d{4}(?:[ -]?\d{3,4}){2,3}(?:[ -]?\d{1,3})?\b", "4111 1111 1111 1111"),
        (r"(?i)ticket-(?:\d+|x)", "TICKET-42"),
        (r"a.c(?s:.)$", "abc\n"),
    ],
)
def test_every_prefix_of_a_match_opens_after_a_space(pattern, match):
    for end in range(1, len(match) + 1):
        assert opens(pattern, "say " + match[:end], 4), match[:end]


@pytest.mark.parametrize(
    ("pattern", "text", "at"),
    [
        (r"\bAKIA[0-9A-Z]{16}", "xAKIA12", 1),  # no word boundary before it
        (r"\bAKIA[0-9A-Z]{16}", "AKIB", 0),
        (r"sk-[a-z]{3}", "sk-abcd", 0),  # longer than any match
        (r"(?i)ticket-\d+", "ticket x", 0),
    ],
)
def test_text_that_cannot_grow_into_a_match_does_not_open(pattern, text, at):
    assert not opens(pattern, text, at)


@pytest.mark.parametrize(
    "pattern", [r"\pL{3}", r"[[:alpha:]]+", r"a{,3}", r"(?=x)y", r"(a)\1", r"(?a)\w"]
)
def test_patterns_python_cannot_read_like_re2_give_none(pattern):
    assert prefixes_pattern(pattern) is None


def test_a_pattern_that_only_matches_empty_text_opens_nowhere():
    assert prefixes_pattern(r"\b") == NEVER
