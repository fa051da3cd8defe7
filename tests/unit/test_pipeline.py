"""Hook order: requests in list order; responses, streams and completion in reverse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import metrics
from gateway.errors import ContentPolicyError
from gateway.exchange import Exchange, JsonReply, Reply, StreamReply
from gateway.pipeline import Pipeline, Stage
from gateway.sse import SseEvent


def exchange() -> Exchange:
    return Exchange("req_1", "chat.completions", "POST", "/v1/chat/completions", {}, "127.0.0.1")


class Recorder(Stage):
    def __init__(self, label: str, calls: list[str], *, fail: bool = False) -> None:
        self.label, self.calls, self.fail = label, calls, fail

    async def on_request(self, exchange: Exchange) -> None:
        self.calls.append(f"request:{self.label}")
        if self.fail:
            raise ContentPolicyError("blocked")

    async def on_response(self, exchange: Exchange, completion: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(f"response:{self.label}")
        return {**completion, "trail": completion.get("trail", "") + self.label}

    def on_stream(
        self, exchange: Exchange, events: AsyncIterator[SseEvent]
    ) -> AsyncIterator[SseEvent]:
        async def wrapped() -> AsyncIterator[SseEvent]:
            async for event in events:
                yield SseEvent(event.data + self.label)

        return wrapped()

    async def on_complete(self, exchange: Exchange) -> None:
        self.calls.append(f"complete:{self.label}")


async def json_forward(exchange: Exchange) -> Reply:
    return JsonReply(200, {}, b'{"trail": ""}')


async def test_response_hooks_run_in_reverse_order():
    calls: list[str] = []
    replies: list[Reply] = []
    pipeline = Pipeline([Recorder("a", calls), Recorder("b", calls)], json_forward)

    async def respond(reply: Reply) -> None:
        replies.append(reply)

    await pipeline.run(exchange(), respond)
    assert calls == ["request:a", "request:b", "response:b", "response:a",
                     "complete:b", "complete:a"]  # fmt: skip
    assert isinstance(replies[0], JsonReply) and replies[0].body == {"trail": "ba"}


async def test_stream_wrappers_nest_in_reverse_order():
    async def events() -> AsyncIterator[SseEvent]:
        yield SseEvent("x")

    async def close() -> None:
        pass

    async def forward(exchange: Exchange) -> Reply:
        return StreamReply(200, {}, events(), close)

    seen: list[str] = []

    async def respond(reply: Reply) -> None:
        assert isinstance(reply, StreamReply)
        seen.extend([event.data async for event in reply.events])

    await Pipeline([Recorder("a", []), Recorder("b", [])], forward).run(exchange(), respond)
    assert seen == ["xba"]


async def test_rejection_stops_later_stages_and_completes_those_that_ran():
    calls: list[str] = []
    pipeline = Pipeline([Recorder("a", calls), Recorder("b", calls, fail=True),
                         Recorder("c", calls)], json_forward)  # fmt: skip
    ex = exchange()
    with pytest.raises(ContentPolicyError):
        await pipeline.run(ex, lambda reply: None)  # type: ignore[arg-type,return-value]
    assert calls == ["request:a", "request:b", "complete:b", "complete:a"]
    assert ex.status == 400 and ex.error_code == "content_policy_violation"


async def test_unchanged_json_is_passed_through_without_parsing():
    replies: list[Reply] = []

    async def respond(reply: Reply) -> None:
        replies.append(reply)

    await Pipeline([Stage()], json_forward).run(exchange(), respond)
    assert isinstance(replies[0], JsonReply) and replies[0].body is None


class Sleeper(Stage):
    """Takes `seconds` of clock time in its request hook."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds  # type: ignore[misc]

    async def on_request(self, exchange: Exchange) -> None:
        await asyncio.sleep(self.seconds)


async def test_each_hook_is_timed_on_its_own_though_they_share_clock_readings():
    stages = [Sleeper("timed_slow", 0.03), Sleeper("timed_fast", 0.0)]
    pipeline = Pipeline(stages, json_forward)
    await pipeline.run(exchange(), lambda reply: None)
    slow, fast = (metrics.STAGE_SECONDS.labels(s.name, "request") for s in stages)
    assert slow._sum.get() >= 0.03 and fast._sum.get() < 0.03
