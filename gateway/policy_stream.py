"""Completion rules on streamed answers: chat and completion chunks, and responses events.

Owns `StreamFilter`, which runs each choice's (or output part's) text through a
`StreamMatcher`, rewrites events to carry only released text, keeps the full-text `done` events
consistent with what was released, and ends a blocked stream the way the API ends a filtered
one (`finish_reason: content_filter`, or `response.incomplete`). Must not decide what matches:
its `Judge` does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from gateway import metrics
from gateway.event_json import json_event, payload_of
from gateway.exchange import Exchange
from gateway.policies import Finding
from gateway.sse import DONE, SseEvent
from gateway.stream_matcher import Release, Scanned, StreamMatcher

Key = tuple[Any, ...]
_HEAD = ("id", "object", "created", "model")  # what identifies a chunk


class Judge(Protocol):
    """What the filter needs from the policy stage for one stream."""

    async def scan(self, text: str, fresh: int) -> Scanned[Finding]: ...
    def record(self, findings: Sequence[Finding]) -> None: ...
    def length_findings(self, total: int) -> list[Finding]: ...


class StreamFilter:
    """Filters one stream; `run` wraps the provider's events."""

    def __init__(self, exchange: Exchange, judge: Judge) -> None:
        self._exchange = exchange
        self._judge = judge
        self._matchers: dict[Key, StreamMatcher[Finding]] = {}
        self._released: dict[Key, str] = {}
        self._total = 0
        self._sequence = 0
        self._base: dict[str, Any] = {}
        self._ended = False
        self._first_in = 0.0
        self._first_out = False

    async def run(self, events: AsyncIterator[SseEvent]) -> AsyncIterator[SseEvent]:
        handle = self._responses_event if self._exchange.endpoint == "responses" else self._chunk
        try:
            async for event in events:
                for out in await handle(event):
                    yield out
                if self._ended:
                    return
        finally:
            self._observe_delay()
            closing = getattr(events, "aclose", None)
            if closing is not None:
                await closing()

    # -- text through the matchers --------------------------------------------------------------

    async def _feed(self, key: Key, text: str, *, final: bool) -> tuple[str, Finding | None]:
        matcher = self._matchers.get(key)
        if matcher is None:
            matcher = self._matchers[key] = StreamMatcher(self._judge.scan)
        if text and not self._first_in:
            self._first_in = time.perf_counter()
        release = await matcher.feed(text)
        if final:
            rest = await matcher.finish()
            release = Release(release.text + rest.text, release.matches + rest.matches,
                              release.blocked or rest.blocked)  # fmt: skip
        if release.matches:
            self._judge.record(release.matches)
        out, blocked = self._limit(release.text, release.blocked)
        if blocked is not None:
            self._judge.record([blocked])
            self._ended = True
        self._released[key] = self._released.get(key, "") + out
        if out and not self._first_out:
            self._first_out = True
            self._observe_delay()
        return out, blocked

    def _limit(self, text: str, blocked: Finding | None) -> tuple[str, Finding | None]:
        """Applies max-length rules to the running total of released text."""
        before = self._total
        self._total += len(text)
        for finding in self._judge.length_findings(self._total):
            self._judge.record([finding])
            if finding.effect != "pass":
                return text[: max(0, finding.start - before)], blocked or finding
        return text, blocked

    def _observe_delay(self) -> None:
        if self._first_in and self._first_in > 0:
            delay = time.perf_counter() - self._first_in
            metrics.observer(metrics.POLICY_STREAM_DELAY_SECONDS, self._exchange.endpoint)(delay)
            self._first_in = -1.0

    # -- chat.completions and completions ------------------------------------------------------

    async def _chunk(self, event: SseEvent) -> list[SseEvent]:
        if event.is_done:
            return [*await self._flush_choices(), event]
        payload = payload_of(event)
        if payload is None or not payload.get("choices"):
            return [event]
        self._base = payload  # its identifying fields start any chunk the filter adds
        keep = False
        for choice in payload["choices"]:
            keep = await self._choice(choice) or keep
        if self._ended:
            return [json_event(payload), SseEvent(DONE)]
        return [json_event(payload)] if keep else []

    async def _choice(self, choice: dict[str, Any]) -> bool:
        """Filters one choice in place; False when nothing is left worth sending."""
        chat = self._exchange.endpoint == "chat.completions"
        holder = choice.get("delta") if chat else choice
        field = "content" if chat else "text"
        if not isinstance(holder, dict):
            return True
        text = holder.get(field)
        finishing = choice.get("finish_reason") is not None
        key = ("choice", choice.get("index", 0))
        if not isinstance(text, str) and not finishing:
            return True
        out, blocked = await self._feed(key, text if isinstance(text, str) else "",
                                        final=finishing)  # fmt: skip
        if isinstance(text, str) or out:
            holder[field] = out
        if blocked is not None:
            choice["finish_reason"] = _finish_reason(blocked)
        if out or finishing or blocked is not None or text == "":
            return True
        return any(v is not None for k, v in holder.items() if k != field)  # other delta fields

    async def _flush_choices(self) -> list[SseEvent]:
        events = []
        for key in [k for k in self._matchers if k[0] == "choice"]:
            out, blocked = await self._feed(key, "", final=True)
            if out or blocked:
                events.append(json_event(self._chunk_for(key[1], out, blocked)))
            if blocked:
                break
        return events

    def _chunk_for(self, index: int, text: str, blocked: Finding | None) -> dict[str, Any]:
        chat = self._exchange.endpoint == "chat.completions"
        choice: dict[str, Any] = {
            "index": index,
            "finish_reason": _finish_reason(blocked) if blocked else None,
        }
        if chat:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
        head: dict[str, Any] = {k: self._base[k] for k in _HEAD if k in self._base}
        return {**head, "choices": [choice]}

    # -- responses -------------------------------------------------------------------------------

    async def _responses_event(self, event: SseEvent) -> list[SseEvent]:
        payload = payload_of(event)
        if payload is None:
            return [event]
        kind = payload.get("type")
        if kind in ("response.created", "response.in_progress"):
            self._base = dict(payload.get("response") or {})
        if kind == "response.output_text.delta":
            return await self._response_delta(payload)
        if kind == "response.output_text.done":
            return await self._response_text_done(payload)
        self._rewrite_full_texts(payload)
        return [self._numbered(payload, event.event)]

    async def _response_delta(self, payload: dict[str, Any]) -> list[SseEvent]:
        key = ("part", payload.get("item_id"), payload.get("content_index", 0))
        out, blocked = await self._feed(key, str(payload.get("delta") or ""), final=False)
        events = [self._numbered({**payload, "delta": out}, payload["type"])] if out else []
        if blocked is not None:
            events.append(self._incomplete(key, blocked))
        return events

    async def _response_text_done(self, payload: dict[str, Any]) -> list[SseEvent]:
        key = ("part", payload.get("item_id"), payload.get("content_index", 0))
        out, blocked = await self._feed(key, "", final=True)
        events = []
        if out:
            names = ("item_id", "output_index", "content_index")
            delta: dict[str, Any] = {k: payload[k] for k in names if k in payload}
            delta.update(type="response.output_text.delta", delta=out, logprobs=[])
            events.append(self._numbered(delta, "response.output_text.delta"))
        if blocked is not None:
            return [*events, self._incomplete(key, blocked)]
        payload["text"] = self._released.get(key, "")
        return [*events, self._numbered(payload, payload["type"])]

    def _rewrite_full_texts(self, payload: dict[str, Any]) -> None:
        """Makes `done` and `completed` events carry the released text, not the original."""
        part = payload.get("part")
        if isinstance(part, dict) and part.get("type") == "output_text":
            key = ("part", payload.get("item_id"), payload.get("content_index", 0))
            part["text"] = self._released.get(key, "")
        items = [payload.get("item")] + list((payload.get("response") or {}).get("output") or [])
        for item in items:
            if not isinstance(item, dict):
                continue
            for index, content in enumerate(item.get("content") or ()):
                if isinstance(content, dict) and content.get("type") == "output_text":
                    content["text"] = self._released.get(("part", item.get("id"), index), "")

    def _incomplete(self, key: Key, blocked: Finding) -> SseEvent:
        self._ended = True
        response = {**self._base, "status": "incomplete",
                    "incomplete_details": {"reason": _finish_reason(blocked)}}  # fmt: skip
        text = self._released.get(key, "")
        response["output"] = [
            {
                "id": key[1],
                "type": "message",
                "status": "incomplete",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        return self._numbered({"type": "response.incomplete", "response": response},
                              "response.incomplete")  # fmt: skip

    def _numbered(self, payload: dict[str, Any], name: str | None) -> SseEvent:
        payload["sequence_number"] = self._sequence
        self._sequence += 1
        return json_event(payload, event=name)


def _finish_reason(blocked: Finding | None) -> str:
    """A truncating length rule ends like a token limit; every other block is a filter."""
    if blocked is not None and blocked.rule.kind == "max_length" and blocked.effect == "redact":
        return "length"
    return "content_filter"
