"""JSON inside SSE events: the payload an event carries, and an event made from a payload.

Owns the one place stream stages turn event data into JSON and back. Every stage that reads a
stream does this for every event, so it uses orjson (about 4x faster to read and 10x to write
than the standard library), and falls back to the standard library for what orjson refuses
(reading NaN, Infinity or lone surrogates; writing integers past 64 bits), so that no event
slips past a stage that reads it. NaN and Infinity are written back as null, which is valid
JSON. Must not know OpenAI payloads beyond the `[DONE]` sentinel.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from gateway.sse import SseEvent


def payload_of(event: SseEvent) -> dict[str, Any] | None:
    """The event's data as a JSON object; None for `[DONE]`, non-JSON or another JSON type."""
    if event.is_done:
        return None
    try:
        payload = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        try:
            payload = json.loads(event.data)
        except ValueError:
            return None
    return payload if isinstance(payload, dict) else None


def json_event(payload: dict[str, Any], *, event: str | None = None) -> SseEvent:
    """An event whose data is `payload` serialized compactly (UTF-8, no ASCII escapes)."""
    try:
        data = orjson.dumps(payload).decode()
    except TypeError:  # orjson.JSONEncodeError, or "Integer exceeds 64-bit range"
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return SseEvent(data, event)
