"""JSON in SSE events: orjson's fast path, and the standard library for what it refuses."""

from __future__ import annotations

import json

import pytest

from gateway.event_json import json_event, payload_of
from gateway.sse import SseEvent


@pytest.mark.parametrize(
    ("data", "expected"),
    [('{"a": 1}', {"a": 1}), ("[DONE]", None), ("not json", None), ("[1, 2]", None)],
)
def test_the_payload_is_the_json_object_or_none(data, expected):
    assert payload_of(SseEvent(data)) == expected


@pytest.mark.parametrize(
    ("data", "written"),
    [  # orjson refuses each of these; the standard library reads them
        ('{"delta": {"content": "\\ud800 lone"}}', {"delta": {"content": "\ud800 lone"}}),
        ('{"score": NaN, "delta": {"content": "x"}}', {"score": None, "delta": {"content": "x"}}),
    ],
)
def test_what_orjson_refuses_is_still_read_so_no_event_escapes_a_stage(data, written):
    payload = payload_of(SseEvent(data))
    assert payload is not None and payload.keys() == written.keys()
    assert json.loads(json_event(payload).data) == written


def test_events_are_written_compactly_without_ascii_escapes():
    payload = {"choices": [{"delta": {"content": 'Grüße, 世界 — "ok"\n'}}], "n": 1.5}
    event = json_event(payload, event="delta")
    assert event.event == "delta"
    assert event.data == json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    assert payload_of(event) == payload


def test_an_integer_past_64_bits_is_still_written():
    assert json.loads(json_event({"n": 2**70}).data) == {"n": 2**70}
