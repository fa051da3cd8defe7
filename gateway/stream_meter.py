"""Metering a streamed completion against a token allowance, and reading usage from payloads.

Owns counting a stream's completion characters (chat and completions chunks, tool-call
arguments included, and the Responses API's text deltas), taking the provider's usage when it
reports one, hiding the usage chunk the gateway asked for on the client's behalf, and cutting
a stream at its allowance in the wire form the openai SDK understands. Must not reserve or
settle limits (the `RateLimit` stage and the `Limiter` do) nor do I/O.
"""

from __future__ import annotations

from typing import Any

from gateway.event_json import json_event, payload_of
from gateway.exchange import Exchange, Usage
from gateway.sse import SseEvent
from gateway.tokens import CHARS_PER_TOKEN


def usage_of(payload: Any) -> Usage | None:
    """Usage from a completion, a usage chunk, or a Responses API response object."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


class StreamMeter:
    """Per-stream state: characters of completion so far, and the Responses API envelope.

    `feed` returns what to pass on for each event: the event, nothing (the usage chunk the
    gateway asked for on the client's behalf), or, once `allowance` tokens are used up, the
    cut: the part that fits, a `finish_reason: length` chunk (or `response.incomplete`),
    usage if the client asked for it, and `[DONE]`; `cut` is then true."""

    def __init__(self, exchange: Exchange, prompt_tokens: int, allowance: int | None) -> None:
        self.exchange = exchange
        self.prompt_tokens = prompt_tokens
        self.allowance = allowance
        self.room = None if allowance is None else allowance * CHARS_PER_TOKEN
        self.chars = 0
        self.cut = False
        self.sequence = 0
        self.response: dict[str, Any] | None = None

    def feed(self, event: SseEvent) -> list[SseEvent]:
        if event.is_done:
            return [event]
        payload = payload_of(event)
        if payload is None:
            return [event]
        if self.exchange.endpoint == "responses":
            return self._responses_event(event, payload)
        usage = usage_of(payload)
        if usage is not None:
            self.exchange.usage = usage
            if not payload.get("choices") and not self.exchange.client_wants_usage:
                return []  # the usage chunk the gateway asked for on the client's behalf
        return self._chunk(event, payload)

    def _chunk(self, event: SseEvent, payload: dict[str, Any]) -> list[SseEvent]:
        choices = payload.get("choices") or []
        text = "".join(_choice_text(c) for c in choices if isinstance(c, dict))
        if self.room is None or self.chars + len(text) <= self.room:
            self.chars += len(text)
            return [event]
        keep = self.room - self.chars
        self.chars, self.cut = self.room, True
        out = [json_event(_truncated(payload, keep))] if keep > 0 else []
        out.append(json_event(_length_chunk(payload, self.exchange.endpoint)))
        if self.exchange.client_wants_usage:
            out.append(json_event(self._usage_chunk(payload)))
        self._charge_allowance()
        return [*out, SseEvent("[DONE]")]

    def _responses_event(self, event: SseEvent, payload: dict[str, Any]) -> list[SseEvent]:
        self.sequence = int(payload.get("sequence_number") or self.sequence)
        kind = payload.get("type")
        if kind == "response.created" and isinstance(payload.get("response"), dict):
            self.response = payload["response"]
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            usage = usage_of(payload.get("response"))
            if usage is not None:
                self.exchange.usage = usage
        if kind != "response.output_text.delta":
            return [event]
        text = str(payload.get("delta") or "")
        if self.room is None or self.chars + len(text) <= self.room:
            self.chars += len(text)
            return [event]
        keep = self.room - self.chars
        self.chars, self.cut = self.room, True
        out = [json_event({**payload, "delta": text[:keep]}, event=event.event)] if keep > 0 else []
        incomplete = {**(self.response or {}), "status": "incomplete",
                      "incomplete_details": {"reason": "max_output_tokens"}}  # fmt: skip
        done = {"type": "response.incomplete", "sequence_number": self.sequence + 1,
                "response": incomplete}  # fmt: skip
        self._charge_allowance()
        return [*out, json_event(done, event="response.incomplete")]

    def _usage_chunk(self, payload: dict[str, Any]) -> dict[str, Any]:
        prompt = self.prompt_tokens
        completion = self.room // CHARS_PER_TOKEN if self.room is not None else 0
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}  # fmt: skip
        return {**_envelope(payload), "choices": [], "usage": usage}

    def _charge_allowance(self) -> None:
        """A cut stream is charged exactly what its budget allowed."""
        self.exchange.usage = Usage(self.prompt_tokens, self.allowance or 0)


def _choice_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return str(choice.get("text") or "")
    delta = choice.get("delta") or {}
    parts = [str(delta.get("content") or "")]
    for call in delta.get("tool_calls") or ():
        parts.append(str(((call or {}).get("function") or {}).get("arguments") or ""))
    return "".join(parts)


def _truncated(payload: dict[str, Any], keep: int) -> dict[str, Any]:
    """The chunk with only its first `keep` characters of content (first choice)."""
    choice = dict((payload.get("choices") or [{}])[0])
    if "text" in choice:
        choice["text"] = str(choice.get("text") or "")[:keep]
    else:
        delta = dict(choice.get("delta") or {})
        delta["content"] = str(delta.get("content") or "")[:keep]
        delta.pop("tool_calls", None)
        choice["delta"] = delta
    return {**payload, "choices": [choice]}


def _envelope(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: payload[k] for k in ("id", "object", "created", "model") if k in payload}


def _length_chunk(payload: dict[str, Any], endpoint: str) -> dict[str, Any]:
    if endpoint == "completions":
        choice: dict[str, Any] = {"text": "", "index": 0, "logprobs": None}
    else:
        choice = {"index": 0, "delta": {}, "logprobs": None}
    choice["finish_reason"] = "length"
    return {**_envelope(payload), "choices": [choice]}
