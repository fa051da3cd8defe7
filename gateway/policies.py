"""The policy set: compiling the rules of a policy directory, and scanning text with them.

Owns loading a directory into a `PolicySet` (reading and validating the files is
`gateway.policy_loader`'s), compiling every text rule at load into one pass per direction,
choosing the policies that apply to a request, and finding matches in prompts and completions,
with how far a streamed text is safe to release (what a finding is, and the findings of
rules without a text pass, are `gateway.policy_findings`'s). Must not edit OpenAI payloads (the
`EnforcePolicy` stage does) nor import the redaction engine: entity rules ask an `EntityFinder`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from gateway.exchange import PolicyDecision, Principal
from gateway.injection import InjectionSignals, rule_signals
from gateway.policy_findings import EntityFinder as EntityFinder
from gateway.policy_findings import EntityHit as EntityHit
from gateway.policy_findings import Finding as Finding
from gateway.policy_findings import (
    Rules,
    canary_findings,
    canary_opening,
    injection_findings,
    length_findings,
)

# Loading lives in policy_loader; its names are re-exported for the callers of this module.
from gateway.policy_loader import PolicyError as PolicyError
from gateway.policy_loader import Problem
from gateway.policy_loader import check_files as check_files
from gateway.policy_loader import line_of as line_of
from gateway.policy_loader import parse_policy as parse_policy
from gateway.policy_loader import policy_files as policy_files
from gateway.policy_loader import policy_set_hash as policy_set_hash
from gateway.policy_loader import read_directory as read_directory
from gateway.policy_schema import (
    CanaryRule,
    EntitiesRule,
    InjectionRule,
    MaxLengthRule,
    Policy,
    RegexRule,
    RequestRule,
    WordsRule,
)
from gateway.redaction_rules import RedactionRules
from gateway.scanner import JointPass, RuleKey, Scan, TextScanner, rule_pattern
from gateway.stream_matcher import Release, Scanned, settle

TextDirection = Literal["prompt", "completion"]
DIRECTIONS: tuple[TextDirection, ...] = ("prompt", "completion")
_SELECTIONS = 1024


def load_policies(
    directory: Path, *, hold_cap: int = 256, entities_available: bool = True
) -> PolicySet:
    """Reads, validates and compiles a directory. Raises PolicyError listing every problem."""
    try:
        files = read_directory(directory)
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([Problem(str(directory), 0, f"cannot read: {exc}")]) from exc
    policies, problems = check_files(files)
    if not problems and not entities_available:
        problems = _entity_problems(policies)
    if problems:
        raise PolicyError(problems)
    return PolicySet(tuple(policies), policy_set_hash(files), str(directory), hold_cap=hold_cap)


def _entity_problems(policies: Sequence[Policy]) -> list[Problem]:
    return [
        Problem(f"policy {p.id}", 0, "entity rules need the redaction engine "
                "(set redaction.enabled: true)", p.id, rule.id, "entities")
        for p in policies for rule in p.rules if isinstance(rule, EntitiesRule)
    ]  # fmt: skip


# --- the compiled set ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """The policies that apply to one request, and what enforcing them takes (gathered once)."""

    ids: frozenset[str]
    holds: dict[str, int]
    plans: dict[str, _Plan]  # per direction
    requests: tuple[tuple[Policy, RequestRule], ...]
    canary: bool  # whether a canary rule applies

    def hold(self, direction: str) -> int:
        return self.holds.get(direction, 1)


class PolicySet:
    """Immutable, compiled policies; a reload builds a new one and swaps it in whole."""

    def __init__(
        self, policies: tuple[Policy, ...], digest: str, source: str = "", *, hold_cap: int = 256
    ) -> None:
        self.policies = policies
        self.hash = digest
        self.source = source
        self._by_id = {p.id: p for p in policies}
        self._rules: dict[RuleKey, tuple[Policy, Any]] = {
            (p.id, r.id): (p, r) for p in policies for r in p.rules
        }
        self._kinds: dict[type, list[tuple[Policy, Any]]] = {}
        for policy, rule in self._rules.values():
            self._kinds.setdefault(type(rule), []).append((policy, rule))
        self._widths: dict[RuleKey, int] = {}
        self._scanners = {d: self._compile(d, hold_cap) for d in DIRECTIONS}
        self._injection = {(p.id, r.id): rule_signals(r) for p, r in self._of(InjectionRule)}
        self._selections: dict[tuple[Any, ...], Selection] = {}
        self._plans: dict[tuple[frozenset[str], TextDirection], _Plan] = {}
        self._decisions: dict[tuple[str, str, str], PolicyDecision] = {}

    @property
    def rule_count(self) -> int:
        return len(self._rules)

    def policy(self, policy_id: str) -> Policy:
        return self._by_id[policy_id]

    def _of(self, kind: type) -> list[tuple[Policy, Any]]:
        return self._kinds.get(kind, [])

    def _compile(self, direction: str, hold_cap: int) -> TextScanner:
        patterns = []
        for (policy_id, rule_id), (_, rule) in self._rules.items():
            if not isinstance(rule, RegexRule | WordsRule) or not _covers(rule, direction):
                continue
            item = rule_pattern((policy_id, rule_id), rule, hold_cap)
            self._widths[item.key] = item.width
            patterns.append(item)
        return TextScanner(patterns)

    def select(
        self, tenant: str | None, roles: tuple[str, ...], model: str, endpoint: str
    ) -> Selection:
        """The policies whose `applies_to` covers this request (cached per distinct scope)."""
        key = (tenant, roles, model, endpoint)
        selection = self._selections.get(key)
        if selection is None:
            if len(self._selections) >= _SELECTIONS:
                self._selections.clear()
            selection = self._selections[key] = self._select(*key)
        return selection

    def _select(
        self, tenant: str | None, roles: tuple[str, ...], model: str, endpoint: str
    ) -> Selection:
        ids = frozenset(p.id for p in self.policies
                        if _applies(p, tenant, roles, model, endpoint))  # fmt: skip
        return self._selection(ids)

    def select_all(self) -> Selection:
        """Every policy, whatever its scope (for tests and `policy explain`)."""
        return self._selection(frozenset(self._by_id))

    def select_for(self, principal: Principal | None, model: str, endpoint: str) -> Selection:
        if principal is None:
            return self.select(None, (), model, endpoint)
        selection = self._selections.get((principal.tenant, principal.roles, model, endpoint))
        return selection or self.select(principal.tenant, principal.roles, model, endpoint)

    def _selection(self, ids: frozenset[str]) -> Selection:
        holds: dict[str, int] = {d: self._hold(ids, d) for d in DIRECTIONS}
        plans: dict[str, _Plan] = {d: self._plan(ids, d) for d in DIRECTIONS}
        requests = self._chosen_of(ids, RequestRule)
        return Selection(ids, holds, plans, requests, bool(self._chosen_of(ids, CanaryRule)))

    def _hold(self, ids: frozenset[str], direction: str) -> int:
        widths = [w for key, w in self._widths.items()
                  if key[0] in ids and _covers(self._rules[key][1], direction)]  # fmt: skip
        widths += [r.max_match_chars for p, r in self._of(EntitiesRule)
                   if p.id in ids and _covers(r, direction)]  # fmt: skip
        return max(widths, default=1)

    def rules_of(self, selection: Selection, kind: type) -> Rules:
        """The selected policies' rules of one kind."""
        return self._chosen_of(selection.ids, kind)

    def _chosen_of(self, ids: frozenset[str], kind: type) -> Rules:
        return tuple((p, r) for p, r in self._of(kind) if p.id in ids)

    def decision(self, finding: Finding, direction: str) -> PolicyDecision:
        """`finding.decision(direction, self.hash)`, built once per rule and direction."""
        key = (finding.policy.id, finding.rule.id, direction)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decisions[key] = finding.decision(direction, self.hash)
        return decision

    def needs_entities(self) -> bool:
        return bool(self._of(EntitiesRule))

    def redaction_sections(self) -> list[RedactionRules]:
        return [p.redaction for p in self.policies if p.redaction is not None]

    async def scan(
        self, selection: Selection, text: str, direction: TextDirection, *,
        canary: str | None = None, finder: EntityFinder | None = None, fresh: int | None = 0,
    ) -> Scanned[Finding]:  # fmt: skip
        """Every match of the selected rules in `text`, and how far the text is safe.

        A stream passes the text it released last as context before `fresh`, the start of the
        text not released yet: text rules search from there, and hold back only from the first
        position where one of their matches could still be starting (`fresh=None`: a whole
        text, all of it safe).
        """
        plan = selection.plans[direction]
        scanned = plan.scanner.scan(text, fresh or 0)
        whole = fresh is None  # nothing follows: every match is final, all of the text is safe
        opening = (
            len(scanned.normalised.text) if whole else plan.scanner.opening(scanned, selection.ids)
        )
        findings: list[Finding] = []
        leaked = canary and plan.canaries and canary in text
        if scanned.hits or plan.entities or plan.injections or leaked:  # else none to find
            findings = await self._findings(plan, text, scanned, opening, canary, finder)
        if whole:
            return Scanned(findings, len(text))
        safe = scanned.normalised.index(opening)  # text rules hold back only where one may start
        holds = [r.max_match_chars for _, r in plan.entities]
        safe = min(safe, len(text) - max(holds) + 1) if holds else safe  # entities: full width
        if direction == "completion" and canary:
            safe = min(safe, canary_opening(text, canary))
        return Scanned(findings, max(0, safe))

    def _plan(self, ids: frozenset[str], direction: TextDirection) -> _Plan:
        """The selected rules a scan in `direction` runs (cached per distinct selection)."""
        key = (ids, direction)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _SELECTIONS:
                self._plans.clear()
            plan = self._plans[key] = self._make_plan(ids, direction)
        return plan

    def _make_plan(self, ids: frozenset[str], direction: TextDirection) -> _Plan:
        prompt = direction == "prompt"
        chosen = self._chosen_of(ids, InjectionRule) if prompt else ()
        injections = tuple((p, r, self._injection[(p.id, r.id)]) for p, r in chosen)
        lengths = () if prompt else self._chosen_of(ids, MaxLengthRule)
        entities = tuple((p, r) for p, r in self._chosen_of(ids, EntitiesRule)
                         if _covers(r, direction))  # fmt: skip
        scanner = self._scanners[direction]
        # ASCII texts: text rules (and a prompt's injection rules) in one set pass
        joint = JointPass([[p.pattern for p in scanner.patterns],
                           *(s.ascii_patterns for _, _, s in injections)])  # fmt: skip
        canaries = () if prompt else self._chosen_of(ids, CanaryRule)
        shortest = min((rule.max_chars for _, rule in lengths), default=sys.maxsize)
        # rules that can find something in a text where no pattern matched: no quick pass
        blind = entities or any(signals.min_hidden <= 0 for _, _, signals in injections)
        return _Plan(ids, scanner, entities, injections, canaries, lengths, joint, shortest,
                     -1 if blind else shortest)  # fmt: skip

    async def _findings(
        self, plan: _Plan, text: str, scanned: Scan, opening: int, canary: str | None,
        finder: EntityFinder | None, injected: Sequence[Sequence[int]] = (),
    ) -> list[Finding]:  # fmt: skip
        """Text rule hits of the selected policies, then entity, injection and canary findings."""
        ids = plan.ids
        findings = [
            Finding(policy, rule, hit.start, hit.end, hit.whole < opening)
            for hit in scanned.hits if hit.key[0] in ids
            for policy, rule in [self._rules[hit.key]]
        ] if scanned.hits else []  # fmt: skip
        if plan.entities and text:  # only then the finder is asked: a coroutine per text
            findings += await self._entities(plan.entities, text, finder)
        if plan.injections:
            findings += injection_findings(plan.injections, text, scanned.normalised.text, injected)
        if canary and plan.canaries:
            findings += canary_findings(plan.canaries, text, canary)
        return findings

    async def _entities(
        self, rules: Rules, text: str, finder: EntityFinder | None
    ) -> list[Finding]:
        if finder is None:
            raise PolicyError([Problem(self.source, 0, "entity rules need the redaction engine")])
        wanted = frozenset(e for _, r in rules for e in r.entities)
        hits = await finder.find_entities(text, wanted)
        return [
            Finding(p, r, h.start, h.end, h.start + r.max_match_chars <= len(text), h.entity_type)
            for h in hits for p, r in rules
            if h.entity_type in r.entities and h.score >= r.min_score
        ]  # fmt: skip

    def shortest_length(self, selection: Selection) -> int:
        """The least `max_chars` of the selected length rules (`sys.maxsize` if none)."""
        return selection.plans["completion"].shortest

    def length_findings(self, selection: Selection, total: int) -> list[Finding]:
        """Max-length rules a completion of `total` characters breaks (the span is the excess)."""
        return length_findings(selection.plans["completion"].lengths, total)

    def passes(
        self, selection: Selection, text: str, direction: TextDirection, canary: str | None = None
    ) -> bool:
        """Whether `evaluate` would pass `text` unchanged and find nothing, as one set pass over
        an ASCII text shows (False: it may find something, ask `evaluate`). Synchronous: the
        usual text costs neither a coroutine nor a `Release`."""
        if not text.isascii():
            return False
        plan = selection.plans[direction]
        return plan.clear_of(text, plan.joint.match(text.encode("ascii")), canary)

    async def evaluate(
        self, selection: Selection, text: str, direction: TextDirection, *,
        canary: str | None = None, finder: EntityFinder | None = None,
    ) -> Release[Finding]:  # fmt: skip
        """A whole text: redactions applied, the matches that count, and the block if any."""
        plan = selection.plans[direction]
        injected: Sequence[Sequence[int]] = ()
        if text.isascii():
            subject = text.encode("ascii")
            found = plan.joint.match(subject)
            if plan.clear_of(text, found, canary):
                return Release(text)  # the usual text: no pattern, so no finding either
            matched, *injected = found
            scanned = plan.scanner.scan_matched(text, subject, matched)
        else:
            scanned = plan.scanner.scan(text)
        findings = await self._findings(
            plan, text, scanned, len(scanned.normalised.text), canary, finder, injected
        )
        if plan.lengths:
            findings += length_findings(plan.lengths, len(text))
        if not findings:  # what `settle` answers for no match, without its call
            return Release(text)
        return settle(text, findings, len(text), final=True)[1]


@dataclass(frozen=True, slots=True)
class _Plan:
    """What scanning one direction for one selection takes, gathered once."""

    ids: frozenset[str]
    scanner: TextScanner
    entities: Rules  # covering the direction
    injections: tuple[tuple[Policy, InjectionRule, InjectionSignals], ...]  # prompts only
    canaries: Rules  # completions only
    lengths: Rules  # completions only
    joint: JointPass  # the scanner's patterns, then each injection rule's ASCII ones
    shortest: int  # the least `max_chars` of the length rules
    clear: int  # the longest text that passes if no pattern of `joint` and no canary is in it

    def clear_of(self, text: str, found: Sequence[Sequence[int]], canary: str | None) -> bool:
        """Whether an ASCII text with `found` (its `joint` pass) has no finding."""
        leaked = canary and self.canaries and canary in text
        return not leaked and not any(found) and len(text) <= self.clear


def _covers(rule: Any, direction: str) -> bool:
    return getattr(rule, "direction", direction) in (direction, "both")


def _matches(patterns: Sequence[str], value: str | None) -> bool:
    if value is None:
        return "*" in patterns
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def _applies(
    policy: Policy, tenant: str | None, roles: tuple[str, ...], model: str, endpoint: str
) -> bool:
    scope = policy.applies_to
    role_ok = "*" in scope.roles or any(_matches(scope.roles, r) for r in roles)
    return (_matches(scope.tenants, tenant) and role_ok and _matches(scope.models, model)
            and _matches(scope.endpoints, endpoint))  # fmt: skip
