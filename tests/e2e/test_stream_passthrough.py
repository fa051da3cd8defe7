"""Streams no stage reads pass through as the provider's bytes; a reading stage re-frames them.

The provider here is a raw aiohttp handler, so the test decides every byte: a comment, CRLF
line ends, and writes cut in the middle of events. Without a stage that reads the stream the
client gets exactly those bytes; with one (the rate limiter's usage meter) it gets the same
events re-encoded. Either way the openai SDK reads the same text, and a provider that dies in
the middle of an event leaves the client one whole error event, never half of the event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.conftest import TEST_KEY, free_port


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": text} if text else {},
                         "finish_reason": finish}]}  # fmt: skip


EVENTS = (
    b": provider keep-alive\n\n"
    + b"data: " + json.dumps(chunk("Hello")).encode() + b"\r\n\r\n"
    + b"data: " + json.dumps(chunk(", world")).encode() + b"\n\n"
    + b"data: " + json.dumps(chunk("", "stop")).encode() + b"\n\n"
    + b"data: [DONE]\n\n"
)  # fmt: skip
CUTS = (7, 40, 41, 150, len(EVENTS) - 3)  # mid-comment, mid-event, mid-CRLF, mid-[DONE]


class RawProvider:
    """Answers every chat completion with `body`, written in the pieces `cuts` make."""

    def __init__(self, body: bytes, cuts: tuple[int, ...], die: bool = False) -> None:
        self.body, self.cuts, self.die = body, cuts, die
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        edges = [0, *self.cuts, len(self.body)]
        for start, end in zip(edges, edges[1:], strict=False):
            await response.write(self.body[start:end])
            await asyncio.sleep(0.02)
        if self.die:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response


@pytest.fixture
async def raw_provider(request: pytest.FixtureRequest) -> AsyncIterator[RawProvider]:
    body, cuts, die = getattr(request, "param", (EVENTS, CUTS, False))
    raw = RawProvider(body, cuts, die)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", raw.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", raw.port).start()
    yield raw
    await runner.cleanup()


def config_for(raw: RawProvider, **sections: Any) -> dict[str, Any]:
    return {
        "providers": {"raw": {"base_url": f"http://127.0.0.1:{raw.port}/v1",
                              "retries": {"attempts": 0}}},
        "models": [{"name": "gpt-4o-mini", "provider": "raw"}],
        "auth": {"mode": "disabled"},
        **sections,
    }  # fmt: skip


METERED = {"limits": {"enabled": True, "backend": "memory",
                      "tiers": {"t": {"tokens_per_minute": 100000}},
                      "assignment": {"default_tier": "t"}}}  # fmt: skip


async def raw_stream(url: str) -> bytes:
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TEST_KEY}"}
        ) as response,
    ):
        assert response.status == 200
        return await response.read()


async def sdk_text(gateway: Any) -> str:
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_a_stream_no_stage_reads_reaches_the_client_byte_for_byte(
    raw_provider, start_gateway
):
    gateway = await start_gateway(config_for(raw_provider))
    assert await raw_stream(gateway.url) == EVENTS
    assert await sdk_text(gateway) == "Hello, world"


async def test_a_stage_that_reads_the_stream_gets_and_passes_on_whole_events(
    raw_provider, start_gateway
):
    gateway = await start_gateway(config_for(raw_provider, **METERED))
    received = await raw_stream(gateway.url)
    assert b"keep-alive" not in received and b"\r\n" not in received  # re-encoded events
    assert received.count(b"\n\n") == 4 and received.endswith(b"data: [DONE]\n\n")
    assert await sdk_text(gateway) == "Hello, world"


DIES = (EVENTS[: EVENTS.index(b"[DONE]")], (7, 40, 41, 150), True)  # cut inside the last event


@pytest.mark.parametrize("raw_provider", [DIES], indirect=True)
@pytest.mark.parametrize("sections", [{}, METERED], ids=["passthrough", "metered"])
async def test_a_provider_dying_mid_event_leaves_whole_events_and_one_error(
    raw_provider, start_gateway, sections
):
    raw_provider.body = raw_provider.body[:-20]  # the last event is cut off
    gateway = await start_gateway(config_for(raw_provider, **sections))
    received = await raw_stream(gateway.url)
    events = [e for e in received.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    assert events[-1].startswith(b"data: ") and b'"upstream_unavailable"' in events[-1]
    assert sum(b"upstream_unavailable" in e for e in events) == 1
    for event in events[:-1]:  # every event before the error is whole JSON or a comment
        assert event.startswith(b":") or json.loads(event.removeprefix(b"data: "))
    with pytest.raises(openai.APIError) as caught:
        await sdk_text(gateway)
    assert caught.value.code == "upstream_unavailable"
