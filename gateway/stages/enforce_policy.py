"""`EnforcePolicy`: the policy files applied to requests, answers and streams.

Owns request constraints (models, output tokens, tools, images, store, user pseudonym), prompt
text rules (block with 400 `content_policy_violation`, redact, flag), the canary marker in the
system prompt, and completion rules on full answers and, through a hold-back window, on streams.
Must not scan text itself (`PolicySet` does) nor restore redacted values (`RedactPrompt` does,
after this stage on the way back, so completion rules see the model's placeholders).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Protocol

from gateway import metrics
from gateway.config import PolicySettings
from gateway.errors import ContentPolicyError
from gateway.exchange import Exchange, PolicyDecision
from gateway.log import get_logger
from gateway.payload_text import (
    completion_slots,
    image_parts,
    mark_filtered,
    prompt_slots,
    tool_name,
)
from gateway.pipeline import Stage
from gateway.policies import (
    EntityFinder,
    EntityHit,
    Finding,
    PolicySet,
    Selection,
)
from gateway.policy_schema import Policy, RequestRule
from gateway.policy_store import PolicyStore
from gateway.policy_stream import StreamFilter
from gateway.redaction_rules import EntityRule, RedactionRules
from gateway.sse import SseEvent
from gateway.stream_matcher import Scanned

log = get_logger("gateway.policy")
_NOTES = 1024  # bound on the decisions whose log line and counter are prepared
_TOKEN_KEYS = {"chat.completions": "max_tokens", "completions": "max_tokens",
               "responses": "max_output_tokens"}  # fmt: skip
_ALL_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class EnforcePolicy(Stage):
    """Applies the policies whose scope covers the request, in both directions."""

    name: ClassVar[str] = "enforce_policy"

    def __init__(
        self, store: PolicyStore, settings: PolicySettings, *, finder: EntityFinder | None = None
    ) -> None:
        self._store = store
        self._settings = settings
        self._finder = finder
        key = settings.pseudonym_key
        self._pseudonym_key = key.get_secret_value().encode() if key else secrets.token_bytes(32)
        self._notes: dict[PolicyDecision, _Note] = {}

    async def on_request(self, exchange: Exchange) -> None:
        policies, selection = scope = self._select(exchange)
        exchange.policy_scope = scope  # the answer is judged by the same set and selection
        if not selection.ids:
            return
        for policy, rule in selection.requests:
            self._constrain(exchange, policies, policy, rule)
        await self._scan_prompt(exchange, policies, selection)
        if selection.canary and self._settings.canary:
            _inject_canary(exchange)

    async def on_response(self, exchange: Exchange, completion: dict[str, Any]) -> dict[str, Any]:
        policies, selection = self._scope(exchange)
        if not selection.ids or exchange.status >= 400:
            return completion
        for slot in completion_slots(exchange.endpoint, completion):
            text, started = slot.text, time.perf_counter()
            if policies.passes(selection, text, "completion", exchange.canary):  # the usual text
                _COMPLETION_SECONDS(time.perf_counter() - started)
                continue
            judged, blocked = await self.check_completion(exchange, policies, selection, text)
            if judged is not text:
                slot.set(judged)
            if blocked is not None:
                self._refuse_completion(blocked)
                if slot.owner is not None:
                    mark_filtered(exchange.endpoint, slot.owner)
        return completion

    def on_stream(
        self, exchange: Exchange, events: AsyncIterator[SseEvent]
    ) -> AsyncIterator[SseEvent]:
        policies, selection = self._scope(exchange)
        if not selection.ids or exchange.endpoint not in _TOKEN_KEYS:
            return events
        judge = _StreamJudge(self, exchange, policies, selection)
        return StreamFilter(exchange, judge).run(events)

    # -- shared with the stream filter --------------------------------------------------------

    def record(
        self, exchange: Exchange, policies: PolicySet, findings: Sequence[Finding], direction: str
    ) -> None:
        """Adds one decision per rule and direction to the exchange, and logs it."""
        for finding in findings:
            decision = policies.decision(finding, direction)
            if decision in exchange.decisions:
                continue
            exchange.decisions.append(decision)
            self._note(decision).record(finding.detail)

    async def check_completion(
        self, exchange: Exchange, policies: PolicySet, selection: Selection, text: str
    ) -> tuple[str, Finding | None]:
        """A whole completion text, with redactions applied, and the block that ends it."""
        started = time.perf_counter()
        try:
            release = await policies.evaluate(
                selection, text, "completion", canary=exchange.canary, finder=self._finder
            )
        finally:
            _COMPLETION_SECONDS(time.perf_counter() - started)
        if release.matches:
            self.record(exchange, policies, release.matches, "completion")
        if release.blocked is not None:
            self.record(exchange, policies, [release.blocked], "completion")
            return "", release.blocked
        return release.text, None

    @property
    def finder(self) -> EntityFinder | None:
        return self._finder

    @property
    def completion_block(self) -> str:
        return self._settings.completion_block

    def _note(self, decision: PolicyDecision) -> _Note:
        """The decision's counter and log line, prepared on its first use."""
        note = self._notes.get(decision)
        if note is None:
            if len(self._notes) >= _NOTES:
                self._notes.clear()
            note = self._notes[decision] = _Note.of(decision)
        return note

    def _refuse_completion(self, blocked: Finding) -> None:
        if self._settings.completion_block == "error":
            raise _blocked_error(blocked, "completion")

    # -- request side ---------------------------------------------------------------------------

    def _scope(self, exchange: Exchange) -> tuple[PolicySet, Selection]:
        """The policy set and selection the request was judged by (chosen now if it was not)."""
        if exchange.policy_scope is not None:
            policies, selection = exchange.policy_scope
            if isinstance(policies, PolicySet) and isinstance(selection, Selection):
                return policies, selection
        return self._select(exchange)

    def _select(self, exchange: Exchange) -> tuple[PolicySet, Selection]:
        policies = self._store.current
        if exchange.endpoint == "models":
            return policies, policies.select(None, (), "", "models")
        model = exchange.model or ""
        return policies, policies.select_for(exchange.principal, model, exchange.endpoint)

    async def _scan_prompt(
        self, exchange: Exchange, policies: PolicySet, selection: Selection
    ) -> None:
        for slot in prompt_slots(exchange.endpoint, exchange.body):
            text, started = slot.text, time.perf_counter()
            try:
                if policies.passes(selection, text, "prompt"):  # the usual text
                    continue
                release = await policies.evaluate(selection, text, "prompt", finder=self._finder)
            finally:
                _PROMPT_SECONDS(time.perf_counter() - started)
            if release.matches:
                self.record(exchange, policies, release.matches, "prompt")
            if release.blocked is not None:
                self.record(exchange, policies, [release.blocked], "prompt")
                raise _blocked_error(release.blocked, "request")
            if release.text != text:
                slot.set(release.text)
                exchange.mark_changed()

    def _constrain(
        self, exchange: Exchange, policies: PolicySet, policy: Policy, rule: RequestRule
    ) -> None:
        problems = _violations(exchange, rule)
        if problems:
            finding = Finding(policy, rule, 0, 0, detail=",".join(problems))
            self.record(exchange, policies, [finding], "request")
            if finding.effect == "block":
                raise _blocked_error(finding, "request", problems[0])
        if policy.mode != "enforce":
            return
        if rule.action == "redact" and problems:
            _rewrite(exchange, rule)
        self._set_fields(exchange, rule)

    def _set_fields(self, exchange: Exchange, rule: RequestRule) -> None:
        body = exchange.body
        if rule.max_tokens is not None and not any(k in body for k in _ALL_TOKEN_KEYS):
            body[_TOKEN_KEYS.get(exchange.endpoint, "max_tokens")] = rule.max_tokens
            exchange.mark_changed()
        if rule.force_store_false and exchange.endpoint in ("chat.completions", "responses"):
            body["store"] = False
            exchange.mark_changed()
        if rule.pseudonymize_user and exchange.endpoint != "models":
            pseudonym = self._pseudonym(exchange)
            body["safety_identifier"] = pseudonym
            if "user" in body:
                body["user"] = pseudonym
            exchange.mark_changed()

    def _pseudonym(self, exchange: Exchange) -> str:
        principal = exchange.principal
        who = f"{principal.tenant or ''}/{principal.subject}" if principal else "anonymous"
        digest = hmac.new(self._pseudonym_key, who.encode(), hashlib.sha256).hexdigest()
        return "user_" + digest[:32]


class _StreamJudge:
    """The policy stage as one stream's filter sees it."""

    def __init__(
        self, stage: EnforcePolicy, exchange: Exchange, policies: PolicySet, selection: Selection
    ) -> None:
        self._stage, self._exchange = stage, exchange
        self._policies, self._selection = policies, selection
        self._shortest = policies.shortest_length(selection)

    async def scan(self, text: str, fresh: int) -> Scanned[Finding]:
        started = time.perf_counter()
        try:
            return await self._policies.scan(self._selection, text, "completion", fresh=fresh,
                                             canary=self._exchange.canary,
                                             finder=self._stage.finder)  # fmt: skip
        finally:
            _COMPLETION_SECONDS(time.perf_counter() - started)

    def record(self, findings: Sequence[Finding]) -> None:
        self._stage.record(self._exchange, self._policies, findings, "completion")

    def length_findings(self, total: int) -> list[Finding]:
        if total <= self._shortest:  # the usual stream: within every limit
            return []
        return self._policies.length_findings(self._selection, total)


def _violations(exchange: Exchange, rule: RequestRule) -> list[str]:
    body, model = exchange.body, exchange.model or ""
    problems = []
    if rule.allowed_models is not None and not _glob(rule.allowed_models, model):
        problems.append("model")
    if _glob(rule.denied_models, model):
        problems.append("model")
    if rule.max_tokens is not None and any(
        isinstance(body.get(k), int) and body[k] > rule.max_tokens for k in _ALL_TOKEN_KEYS
    ):
        problems.append("max_tokens")
    if rule.allowed_tools is not None and _denied_tools(body, rule.allowed_tools):
        problems.append("tools")
    if not rule.images and image_parts(exchange.endpoint, body):
        problems.append("images")
    return problems


def _rewrite(exchange: Exchange, rule: RequestRule) -> None:
    """Brings a request within a `redact` constraint: caps tokens, drops tools and images."""
    body = exchange.body
    if rule.max_tokens is not None:
        for key in _ALL_TOKEN_KEYS:
            if isinstance(body.get(key), int) and body[key] > rule.max_tokens:
                body[key] = rule.max_tokens
    if rule.allowed_tools is not None and isinstance(body.get("tools"), list):
        allowed = rule.allowed_tools
        body["tools"] = [t for t in body["tools"] if _glob(allowed, tool_name(t))]
        if not body["tools"]:
            body.pop("tools")
            body.pop("tool_choice", None)
    if not rule.images:
        for content, part in image_parts(exchange.endpoint, body):
            content.remove(part)
    exchange.mark_changed()


def _denied_tools(body: dict[str, Any], allowed: Sequence[str]) -> bool:
    tools = body.get("tools")
    return isinstance(tools, list) and any(not _glob(allowed, tool_name(t)) for t in tools)


def _glob(patterns: Sequence[str], value: str) -> bool:
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def _inject_canary(exchange: Exchange) -> None:
    """Puts a per-request secret marker at the start of the system prompt."""
    canary = "cnry-" + os.urandom(8).hex()  # `secrets.token_hex(8)`, without its two calls
    marker = f"[{canary}]\n"
    body = exchange.body
    if exchange.endpoint == "responses":
        body["instructions"] = marker + str(body.get("instructions") or "")
    elif exchange.endpoint == "chat.completions":
        messages = body["messages"]
        first = messages[0] if messages and isinstance(messages[0], dict) else {}
        if first.get("role") in ("system", "developer") and isinstance(first.get("content"), str):
            first["content"] = marker + first["content"]
        else:
            messages.insert(0, {"role": "system", "content": marker.strip()})
    else:
        return
    exchange.canary = canary
    exchange.mark_changed()


def _blocked_error(finding: Finding, what: str, detail: str | None = None) -> ContentPolicyError:
    policy, rule = finding.policy, finding.rule
    reason = f" ({detail})" if detail else ""
    return ContentPolicyError(
        f"The {what} was blocked by policy '{policy.id}' (version {policy.version}), "
        f"rule '{rule.id}'{reason}. Change the {what} or ask the policy owners.",
        param=detail,
    )


_PROMPT_SECONDS = metrics.observer(metrics.POLICY_SCAN_SECONDS, "prompt")
_COMPLETION_SECONDS = metrics.observer(metrics.POLICY_SCAN_SECONDS, "completion")


@dataclass(frozen=True, slots=True)
class _Note:
    """What recording one decision takes: its counter, and a logger bound to its fields."""

    counter: Callable[[float], None]
    logger: Any

    @classmethod
    def of(cls, decision: PolicyDecision) -> _Note:
        counter = metrics.incrementer(
            metrics.POLICY_DECISIONS, decision.direction, decision.action, decision.severity,
            decision.mode,
        )  # fmt: skip
        logger = log.bind(
            policy_id=decision.policy_id, policy_version=decision.policy_version,
            rule_id=decision.rule_id, action=decision.action, severity=decision.severity,
            mode=decision.mode, direction=decision.direction,
            enforced=decision.mode == "enforce", policy_set_hash=decision.policy_set_hash,
        )  # fmt: skip
        return cls(counter, logger)

    def record(self, detail: str) -> None:
        self.counter(1)
        self.logger.info("policy_decision", detail=detail or None)


class Analyzer(Protocol):
    """The redaction engine's analysis call (`Redactor.analyze`)."""

    async def analyze(
        self, texts: Sequence[str], rules: RedactionRules
    ) -> Sequence[Sequence[Any]]: ...


class AnalyzerFinder:
    """Entity rules' `EntityFinder` on top of the redaction engine (scores filtered by rules)."""

    def __init__(self, analyzer: Analyzer) -> None:
        self._analyzer = analyzer

    async def find_entities(self, text: str, entities: frozenset[str]) -> list[EntityHit]:
        wanted = {name: EntityRule(action="mask", threshold=0.0) for name in sorted(entities)}
        [found] = await self._analyzer.analyze([text], RedactionRules(entities=wanted))
        return [EntityHit(f.entity, f.start, f.end, f.score) for f in found]
