"""Metering a stream against an allowance: counting, the hidden usage chunk, the cut."""

from __future__ import annotations

import json

from gateway.event_json import json_event
from gateway.exchange import Exchange, Usage
from gateway.sse import SseEvent
from gateway.stream_meter import StreamMeter, usage_of
from gateway.tokens import CHARS_PER_TOKEN


def exchange(endpoint: str = "chat.completions", *, wants_usage: bool = False) -> Exchange:
    ex = Exchange("r", endpoint, "POST", f"/v1/{endpoint}", {}, "1.2.3.4")
    ex.client_wants_usage = wants_usage
    return ex


def chunk(text: str) -> SseEvent:
    choice = {"index": 0, "delta": {"content": text}}
    return json_event({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                       "model": "m", "choices": [choice]})  # fmt: skip


def test_usage_is_read_from_chat_and_responses_shapes():
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 5}}) == Usage(3, 5)
    assert usage_of({"usage": {"input_tokens": 2, "output_tokens": 7}}) == Usage(2, 7)
    assert usage_of({"usage": {"prompt_tokens": "3"}}) is None
    assert usage_of(["not", "a", "dict"]) is None


def test_the_usage_chunk_the_client_did_not_ask_for_is_hidden_but_recorded():
    ex = exchange()
    meter = StreamMeter(ex, prompt_tokens=4, allowance=None)
    usage = json_event({"id": "c1", "choices": [], "usage": {"prompt_tokens": 4,
                                                             "completion_tokens": 2}})  # fmt: skip
    assert meter.feed(chunk("hi")) == [chunk("hi")]
    assert meter.feed(usage) == []
    assert ex.usage == Usage(4, 2)
    asked = exchange(wants_usage=True)
    assert StreamMeter(asked, prompt_tokens=4, allowance=None).feed(usage) == [usage]


def test_a_stream_is_cut_at_its_allowance_with_a_length_chunk_and_done():
    ex = exchange()
    meter = StreamMeter(ex, prompt_tokens=4, allowance=2)  # room for 2 * 4 characters
    room = 2 * CHARS_PER_TOKEN
    assert meter.feed(chunk("abcde")) == [chunk("abcde")] and not meter.cut
    out = meter.feed(chunk("fghijk"))
    assert meter.cut
    payloads = [json.loads(e.data) for e in out[:-1]]
    assert payloads[0]["choices"][0]["delta"]["content"] == "fghijk"[: room - 5]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert out[-1].is_done
    assert ex.usage == Usage(4, 2)  # charged exactly what the allowance allowed


def test_a_responses_stream_is_cut_with_response_incomplete():
    ex = exchange("responses")
    meter = StreamMeter(ex, prompt_tokens=1, allowance=1)
    created = json_event({"type": "response.created", "sequence_number": 0,
                          "response": {"id": "resp_1", "status": "in_progress"}},
                         event="response.created")  # fmt: skip
    delta = json_event({"type": "response.output_text.delta", "sequence_number": 1,
                        "delta": "x" * (CHARS_PER_TOKEN + 3)},
                       event="response.output_text.delta")  # fmt: skip
    assert meter.feed(created) == [created]
    out = meter.feed(delta)
    assert [e.event for e in out] == ["response.output_text.delta", "response.incomplete"]
    assert json.loads(out[0].data)["delta"] == "x" * CHARS_PER_TOKEN
    done = json.loads(out[1].data)
    assert done["response"]["status"] == "incomplete" and done["sequence_number"] == 2
