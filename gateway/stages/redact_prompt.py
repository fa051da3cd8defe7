"""`RedactPrompt`: personal data and secrets leave the request before it reaches a provider.

Owns applying each finding's action (pseudonymize, mask, hash, block) to every piece of client
text in a request (found by `gateway.redaction_payload`) and, on the way back, restoring issued
placeholders in completions and streams. Must not detect anything itself (the `Redactor` engine
does) nor log values.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway import metrics
from gateway.errors import ContentPolicyError
from gateway.event_json import json_event, payload_of
from gateway.exchange import Exchange
from gateway.log import debug_enabled, get_logger
from gateway.pipeline import Stage
from gateway.placeholders import (
    PLACEHOLDER,
    Holdback,
    json_escaped,
    placeholder,
    restore_tree,
)
from gateway.redaction_payload import collect_texts
from gateway.redaction_rules import Action, RedactionRules
from gateway.redactor import Finding
from gateway.sse import SseEvent

log = get_logger("gateway.redact_prompt")


class TextAnalyzer(Protocol):
    """What the stage needs from the `Redactor` (tests pass a fake)."""

    rules: RedactionRules

    async def analyze(
        self, texts: Sequence[str], rules: RedactionRules
    ) -> Sequence[Sequence[Finding]]: ...

    def keyed_hash(self, value: str) -> str: ...


RulesFor = Callable[[Exchange], RedactionRules]
"""The rules for one request (e.g. from the policy set); default: the redactor's rules."""


class RedactPrompt(Stage):
    """Replaces findings in every client text; restores placeholders in the answer."""

    name = "redact_prompt"

    def __init__(self, redactor: TextAnalyzer, *, rules_for: RulesFor | None = None) -> None:
        self._redactor = redactor
        self._rules_for = rules_for or (lambda _: redactor.rules)
        self._treatments = Treatments(redactor.rules)

    async def on_request(self, exchange: Exchange) -> None:
        if exchange.endpoint == "models":
            return
        rules = self._rules_for(exchange)
        collected = collect_texts(exchange.endpoint, exchange.body, rules)
        slots = [slot for slot in collected.slots if slot.text.strip()]
        if not slots:
            return
        texts = [slot.text for slot in slots]
        findings = await self._redactor.analyze(texts, rules)
        if not any(findings):
            return
        if self._treatments.rules is not rules:  # e.g. a tenant's policies, or reloaded ones
            self._treatments = Treatments(rules)
        replacer = Replacer(
            exchange, self._treatments, self._redactor.keyed_hash, taken_placeholders(texts)
        )
        for slot, text, found in zip(slots, texts, findings, strict=True):
            if found:
                slot.set(replacer.replace(text, found, slot.where))
        collected.write_json_fields()
        exchange.mark_changed()
        if debug_enabled():
            log.debug("prompt_redacted", entities=dict(exchange.redaction_counts))

    async def on_response(self, exchange: Exchange, completion: dict[str, Any]) -> dict[str, Any]:
        table = restore_table(exchange)
        if table:
            restore_tree(completion, table)
        return completion

    def on_stream(
        self, exchange: Exchange, events: AsyncIterator[SseEvent]
    ) -> AsyncIterator[SseEvent]:
        table = restore_table(exchange)
        if not table:
            return events
        return StreamRestorer(table).run(events)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def restore_table(exchange: Exchange) -> dict[str, str]:
    """Placeholder -> original value, for the placeholders that may be restored (read-only)."""
    if len(exchange.restorable) == len(exchange.placeholders):
        return exchange.placeholders  # all of them: no copy needed
    return {key: exchange.placeholders[key] for key in exchange.restorable}


def taken_placeholders(texts: Sequence[str]) -> set[str]:
    """Placeholder-shaped strings the client wrote itself; new placeholders avoid them."""
    return {match for text in texts if "<" in text for match in PLACEHOLDER.findall(text)}


@dataclass(frozen=True, slots=True)
class Treatment:
    """What findings of one entity type get under some rules, and the counter they add to."""

    action: Action
    restore: bool
    count: metrics.Observe


class Treatments:
    """Each entity type's `Treatment` under one rules object, worked out on its first finding:
    the stage keeps them while the rules stay the same, so a finding costs one lookup."""

    def __init__(self, rules: RedactionRules) -> None:
        self.rules = rules
        self._known: dict[str, Treatment] = {}

    def of(self, entity: str) -> Treatment:
        known = self._known.get(entity)
        if known is None:
            rule = self.rules.rule_for(entity)
            count = metrics.incrementer(metrics.REDACTION_ENTITIES, entity, rule.action)
            known = self._known[entity] = Treatment(rule.action, rule.restore, count)
        return known


class Replacer:
    """Applies each finding's action; one per request, so equal values share a placeholder."""

    def __init__(
        self, exchange: Exchange, treatments: Treatments, hasher: Callable[[str], str],
        taken: set[str],
    ) -> None:  # fmt: skip
        self._exchange = exchange
        self._treatments = treatments
        self._hasher = hasher
        self._taken = taken
        self._issued: dict[tuple[str, str], str] = {}
        self._numbers: dict[str, int] = {}

    def replace(self, text: str, findings: Sequence[Finding], where: str) -> str:
        out, position = [], 0
        for finding in findings:
            out.append(text[position : finding.start])
            out.append(self._substitute(finding.entity, text[finding.start : finding.end], where))
            position = finding.end
        out.append(text[position:])
        return "".join(out)

    def _substitute(self, entity: str, value: str, where: str) -> str:
        treatment = self._treatments.of(entity)
        treatment.count(1)
        action = treatment.action
        if action == "block":
            raise ContentPolicyError(
                f"The request contains a value of type {entity} in {where}, which this gateway "
                "does not forward to the model. Remove it and try again.",
                param=where,
            )
        counts = self._exchange.redaction_counts
        counts[entity] = counts.get(entity, 0) + 1
        if action == "mask":
            return re.sub(r"\S", "*", value)
        if action == "hash":
            return f"<{entity}#{self._hasher(value)}>"
        return self._pseudonym(entity, value, restore=treatment.restore)

    def _pseudonym(self, entity: str, value: str, *, restore: bool) -> str:
        key = (entity, value)
        issued = self._issued.get(key)
        if issued is None:
            issued = self._issued[key] = self._next_placeholder(entity)
            self._exchange.placeholders[issued] = value
            if restore:
                self._exchange.restorable.add(issued)
        return issued

    def _next_placeholder(self, entity: str) -> str:
        number = self._numbers.get(entity, 0) + 1
        while (candidate := placeholder(entity, number)) in self._taken:
            number += 1
        self._numbers[entity] = number
        return candidate


class StreamRestorer:
    """Restores placeholders in stream deltas, per choice / tool call / output item."""

    def __init__(self, table: dict[str, str]) -> None:
        self._table = table
        self._escaped = json_escaped(table)
        self._channels: dict[tuple[Any, ...], Holdback] = {}
        self._last: dict[str, Any] | None = None

    async def run(self, events: AsyncIterator[SseEvent]) -> AsyncIterator[SseEvent]:
        async for event in events:
            if event.is_done:
                leftover = self._leftover_chunk()
                if leftover is not None:
                    yield leftover
                yield event
                continue
            for out in self._event(event):
                yield out
        leftover = self._leftover_chunk()
        if leftover is not None:
            yield leftover

    def _channel(self, key: tuple[Any, ...]) -> Holdback:
        if key not in self._channels:
            self._channels[key] = Holdback(self._escaped if key[0] == "args" else self._table)
        return self._channels[key]

    def _event(self, event: SseEvent) -> list[SseEvent]:
        payload = payload_of(event)
        if payload is None:
            return [event]
        kind = payload.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            return self._responses_event(payload, kind, event.event)
        self._last = payload
        for choice in _list(payload.get("choices")):
            if isinstance(choice, dict):
                self._choice(choice)
        return [json_event(payload, event=event.event)]

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        if isinstance(choice.get("text"), str):  # completions
            choice["text"] = self._channel(("text", index)).feed(choice["text"])
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if isinstance(delta.get("content"), str):
                delta["content"] = self._channel(("content", index)).feed(delta["content"])
            for call in _list(delta.get("tool_calls")):
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    key = ("args", index, call.get("index", 0))
                    function["arguments"] = self._channel(key).feed(function["arguments"])
        if choice.get("finish_reason") is not None:
            self._flush_choice(choice, index)

    def _flush_choice(self, choice: dict[str, Any], index: Any) -> None:
        for key, channel in list(self._channels.items()):
            if len(key) < 2 or key[1] != index:
                continue
            tail = channel.flush()
            if not tail:
                continue
            if key[0] == "text":
                choice["text"] = choice.get("text", "") + tail
                continue
            delta = choice.setdefault("delta", {})
            if key[0] == "content":
                delta["content"] = (delta.get("content") or "") + tail
            else:
                calls = delta.setdefault("tool_calls", [])
                calls.append({"index": key[2], "function": {"arguments": tail}})

    def _leftover_chunk(self) -> SseEvent | None:
        """A last chunk for text still held back when the stream ended without finish_reason."""
        if self._last is None:
            return None
        choices = []
        for key, channel in self._channels.items():
            tail = channel.flush()
            if tail and key[0] == "text":
                choices.append({"index": key[1], "text": tail, "finish_reason": None})
            elif tail and key[0] == "content":
                choices.append({"index": key[1], "delta": {"content": tail},
                                "finish_reason": None})  # fmt: skip
            elif tail:
                call = {"index": key[2], "function": {"arguments": tail}}
                choices.append({"index": key[1], "delta": {"tool_calls": [call]},
                                "finish_reason": None})  # fmt: skip
        if not choices:
            return None
        base = {k: v for k, v in self._last.items() if k not in ("choices", "usage")}
        return json_event({**base, "choices": choices})

    def _responses_event(
        self, payload: dict[str, Any], kind: str, name: str | None
    ) -> list[SseEvent]:
        delta_key = _responses_key(payload, kind, "delta")
        if delta_key is not None:
            payload["delta"] = self._channel(delta_key).feed(str(payload.get("delta", "")))
            return [json_event(payload, event=name)]
        out = []
        done_key = _responses_key(payload, kind, "done")
        if done_key is not None and done_key in self._channels:
            tail = self._channels.pop(done_key).flush()
            if tail:
                extra = {**payload, "type": kind.replace(".done", ".delta"), "delta": tail}
                for field_name in ("text", "arguments"):
                    extra.pop(field_name, None)
                out.append(json_event(extra, event=str(extra["type"])))
        restore_tree(payload, self._table, self._escaped)
        out.append(json_event(payload, event=name))
        return out


def _responses_key(payload: dict[str, Any], kind: str, phase: str) -> tuple[Any, ...] | None:
    """The hold-back channel of a Responses API text or arguments event of `phase` (delta,
    done); None for any other event."""
    if kind == f"response.output_text.{phase}":
        return ("text", payload.get("item_id"), payload.get("content_index"))
    if kind == f"response.function_call_arguments.{phase}":
        return ("args", payload.get("item_id"))
    return None
