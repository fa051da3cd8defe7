"""What a policy scan finds: `Finding` (a rule over a span of text), the entity finder's
interface, and the findings of the rules that need no text pass (injection scores, canaries,
length limits).

Owns those value types and helpers. Must not compile or choose rules (`gateway.policies`
does) nor edit payloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.exchange import PolicyDecision
from gateway.injection import InjectionSignals, injection_score
from gateway.policy_schema import InjectionRule, Policy
from gateway.stream_matcher import Effect

Rules = tuple[tuple[Policy, Any], ...]


@dataclass(frozen=True, slots=True)
class EntityHit:
    entity_type: str
    start: int
    end: int
    score: float


class EntityFinder(Protocol):
    """The redaction engine's analyzer, as entity rules need it."""

    async def find_entities(self, text: str, entities: frozenset[str]) -> Sequence[EntityHit]: ...


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule that matched a span of text (the whole text for injection and length rules)."""

    policy: Policy
    rule: Any
    start: int
    end: int
    final: bool = True
    detail: str = ""

    @property
    def enforced(self) -> bool:
        return self.policy.mode == "enforce"

    @property
    def effect(self) -> Effect:
        if not self.enforced or self.rule.action == "flag":
            return "pass"
        return "block" if self.rule.action == "block" else "redact"

    @property
    def replacement(self) -> str:
        return str(getattr(self.rule, "replacement", ""))

    def decision(self, direction: str, policy_set_hash: str) -> PolicyDecision:
        return PolicyDecision(
            policy_id=self.policy.id, policy_version=self.policy.version, rule_id=self.rule.id,
            action=self.rule.action, severity=self.rule.severity, mode=self.policy.mode,
            direction=direction, policy_set_hash=policy_set_hash,
        )  # fmt: skip


def injection_findings(
    rules: Sequence[tuple[Policy, InjectionRule, InjectionSignals]], text: str, folded: str,
    injected: Sequence[Sequence[int]],
) -> list[Finding]:  # fmt: skip
    """Injection rules' findings; `injected`, when given, holds each rule's ASCII set pass."""
    found = []
    for index, (policy, rule, signals) in enumerate(rules):
        matched = injected[index] if injected else None
        score, names = injection_score(text, signals, folded, matched=matched)
        if names and score >= rule.threshold:
            found.append(Finding(policy, rule, 0, len(text), True, ",".join(names)))
    return found


def canary_findings(rules: Rules, text: str, canary: str) -> list[Finding]:
    at = text.find(canary)
    if at < 0:
        return []
    return [Finding(p, r, at, at + len(canary)) for p, r in rules]


def length_findings(rules: Rules, total: int) -> list[Finding]:
    return [
        Finding(policy, rule, rule.max_chars, total, detail="max_chars")
        for policy, rule in rules if total > rule.max_chars
    ]  # fmt: skip


def canary_opening(text: str, canary: str) -> int:
    """The first position from which `text` ends with the start of the canary (len if none).

    Only a position holding the canary's first character can start it: those are found with
    `str.find` instead of slicing the text at every position of the last `len(canary)`."""
    if not canary:
        return len(text)
    first = canary[0]
    position = text.find(first, max(0, len(text) - len(canary) + 1))
    while position != -1:
        if canary.startswith(text[position:]):
            return position
        position = text.find(first, position + 1)
    return len(text)
