"""Prompt-injection heuristics: override phrases, role-play markers, hidden and encoded text.

Owns compiling one injection rule's phrase lists and scoring a prompt with them: which signals
are present (an override phrase, a role-play marker, invisible characters, a phrase hidden as
tag characters, base64 or hex) and their summed weight. Must not decide what a score means
(the rule's threshold, in `gateway.policies`) nor know policies, scopes or payloads.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from gateway.policy_schema import InjectionRule
from gateway.scanner import normalise, re2_options, searchable, words_pattern

SIGNALS = ("override_phrase", "roleplay_marker", "hidden_text", "encoded_payload")
"""Every signal, in the order a score lists them."""

_HIDDEN = re2.compile(r"[\x{200B}-\x{200F}\x{2060}-\x{2064}\x{FEFF}\x{E0000}-\x{E007F}]")
_TAGS = re2.compile(r"[\x{E0020}-\x{E007E}]+")
_BASE64_RUN = r"[A-Za-z0-9+/]{16,}={0,2}"
_BASE64 = re2.compile(_BASE64_RUN)
_HEX = re2.compile(r"(?:[0-9a-fA-F]{2}){8,}")
_ENCODED = "encoded"  # a base64 run: something may be hidden in it (hex digits are base64 too)


@dataclass(frozen=True, slots=True)
class InjectionSignals:
    """Compiled heuristics of one injection rule.

    `ascii_pass` is one RE2 set over ASCII text (which folding leaves as it is and which holds
    no invisible or tag character): its pattern `i`, `ascii_patterns[i]`, is the phrase list or
    base64 run named `ascii_names[i]`, so one pass says which signals can be present.
    """

    override: Any | None
    roleplay: Any | None
    weights: tuple[float, float, float, float]  # override, roleplay, hidden, encoded
    min_hidden: int
    ascii_pass: Any
    ascii_names: tuple[str, ...]
    ascii_patterns: tuple[str, ...]


def compile_injection(
    override: Sequence[str], roleplay: Sequence[str], weights: tuple[float, float, float, float],
    min_hidden: int,
) -> InjectionSignals:  # fmt: skip
    options = re2_options()
    patterns = {name: words_pattern(words, case_sensitive=False, whole_words=True)
                for name, words in (("override_phrase", override), ("roleplay_marker", roleplay))
                if words}  # fmt: skip
    patterns[_ENCODED] = _BASE64_RUN
    ascii_pass = re2.Set.SearchSet(options)
    for pattern in patterns.values():
        ascii_pass.Add(pattern)
    ascii_pass.Compile()

    def build(name: str) -> Any | None:
        return re2.compile(patterns[name], options) if name in patterns else None

    return InjectionSignals(build("override_phrase"), build("roleplay_marker"), weights,
                            min_hidden, ascii_pass, tuple(patterns),
                            tuple(patterns.values()))  # fmt: skip


def rule_signals(rule: InjectionRule) -> InjectionSignals:
    """An injection rule's phrases, weights and hidden-text minimum, compiled."""
    weights = (rule.override_weight, rule.roleplay_weight, rule.hidden_text_weight,
               rule.encoded_weight)  # fmt: skip
    return compile_injection(rule.override_phrases, rule.roleplay_markers, weights,
                             rule.min_hidden_chars)  # fmt: skip


def injection_score(
    text: str, signals: InjectionSignals, folded: str | None = None, *,
    matched: Sequence[int] | None = None,
) -> tuple[float, list[str]]:  # fmt: skip
    """The score of `text` and the names of the signals found, in `SIGNALS` order.

    `folded` is `normalise(text).text`, when the caller has it already; `matched`, for an ASCII
    text, the indices of `signals.ascii_patterns` found in it, when the caller's own set pass
    searched them already.
    """
    if text.isascii():
        found = _ascii_signals(text, signals, matched)
    else:
        found = _signals(text, normalise(text).text if folded is None else folded, signals)
    if not found:
        return 0.0, found
    score = sum(w for name, w in zip(SIGNALS, signals.weights, strict=True) if name in found)
    return score, found


def _ascii_signals(
    text: str, signals: InjectionSignals, matched: Sequence[int] | None = None
) -> list[str]:
    """`_signals` of an ASCII text, from one set pass (and decoding only if a run may hide text)."""
    if matched is None:
        matched = signals.ascii_pass.Match(text.encode("ascii"))
    if not matched:  # most prompts: no phrase and no run to decode
        return ["hidden_text"] if signals.min_hidden <= 0 else []
    seen = {signals.ascii_names[i] for i in matched}
    found = [name for name in SIGNALS[:2] if name in seen]
    if signals.min_hidden <= 0:
        found.append("hidden_text")
    if _ENCODED in seen and _has_encoded_phrase(text, signals):
        found.append("encoded_payload")
    return found


def _signals(text: str, folded: str, signals: InjectionSignals) -> list[str]:
    """The signals in `text` (whose folded form is `folded`), one search each."""
    subject = searchable(folded)
    found: list[str] = []
    if signals.override is not None and signals.override.search(subject):
        found.append("override_phrase")
    if signals.roleplay is not None and signals.roleplay.search(subject):
        found.append("roleplay_marker")
    if len(_HIDDEN.findall(text)) >= signals.min_hidden:
        found.append("hidden_text")
    if _has_encoded_phrase(text, signals):
        found.append("encoded_payload")
    return found


def _has_encoded_phrase(text: str, signals: InjectionSignals) -> bool:
    for decoded in _decoded_payloads(text):
        folded = searchable(normalise(decoded).text)
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
