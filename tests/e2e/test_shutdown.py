"""Graceful shutdown of real `gateway serve` processes: SIGTERM drains, a second SIGTERM stops."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.e2e.processes import demo_config, free_port, gateway_process, get_fresh

pytestmark = pytest.mark.slow
# Echo mode answers with the prompt, 4 characters per chunk: 21 chunks.
PROMPT = "the quick brown fox jumps over the lazy dog while the gateway drains its streams!!"


def slow_stream_config(workers: int, chunk_delay_ms: float, **server: Any) -> dict[str, Any]:
    config = demo_config(free_port(), workers=workers, **server)
    config["providers"]["demo"]["demo"]["chunk_delay_ms"] = chunk_delay_ms
    return config


async def open_stream(client: openai.AsyncOpenAI) -> tuple[str, Any]:
    """Starts a stream and returns the text of its first chunk and the rest of the stream."""
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return chunk.choices[0].delta.content, stream
    raise AssertionError("the stream ended before any text")


async def rest_of(stream: Any) -> str:
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def wait_refused(url: str, within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            try:
                await get_fresh(url + "/healthz")
            except aiohttp.ClientConnectorError:
                return
            except aiohttp.ServerDisconnectedError:
                pass  # accepted into a closing listener's queue and dropped: closing, not closed
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_a_long_stream_finish_and_refuses_new_work(tmp_path, workers):
    config = slow_stream_config(workers, 100, drain_delay=1.0, shutdown_timeout=10)
    async with gateway_process(config, tmp_path) as gateway:
        first, stream = await open_stream(gateway.client())
        rest = asyncio.create_task(rest_of(stream))
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)
        await gateway.wait_for_event("gateway_draining", count=workers, within=5)

        status, body = await get_fresh(gateway.url + "/readyz")
        assert (status, "draining" in body) == (503, True)
        await wait_refused(gateway.url, within=5)
        assert not rest.done()  # still streaming after the port closed

        assert first + await rest == PROMPT
        assert await gateway.wait_exit(15) == 0
        assert time.monotonic() - signalled < 1.0 + 10


@pytest.mark.parametrize("workers", [1, 2])
async def test_second_sigterm_exits_at_once(tmp_path, workers):
    config = slow_stream_config(workers, 1000, shutdown_timeout=60)
    async with gateway_process(config, tmp_path) as gateway:
        _, stream = await open_stream(gateway.client())
        rest = asyncio.create_task(rest_of(stream))
        gateway.signal(signal.SIGTERM)
        await gateway.wait_for_event("gateway_draining", count=workers, within=5)
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)
        assert await gateway.wait_exit(5) != 0
        assert time.monotonic() - signalled < 3
        with pytest.raises(Exception):  # noqa: B017 - the SDK or httpx, as the connection drops
            await rest


async def test_streams_longer_than_the_deadline_are_cut_and_the_exit_is_clean(tmp_path):
    config = slow_stream_config(1, 500, shutdown_timeout=1)
    async with gateway_process(config, tmp_path) as gateway:
        first, stream = await open_stream(gateway.client())
        rest = asyncio.create_task(rest_of(stream))
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)
        assert await gateway.wait_exit(10) == 0
        assert time.monotonic() - signalled < 4
        # A cut stream raises (openai or httpx, depending on where it broke) or ends short.
        results = await asyncio.gather(rest, return_exceptions=True)
        assert first + str(results[0]) != PROMPT
