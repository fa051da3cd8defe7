"""`gateway serve --workers N`: one port, metrics summed across workers, crashed workers replaced,
and several gateway processes holding one global limit through a shared Redis."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time

import httpx
import openai
import pytest

from tests.e2e.processes import (
    demo_config,
    free_port,
    gateway_process,
    get_fresh,
    metric_sum,
)

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "count me"}]


def fresh_connection_client(gateway) -> openai.AsyncOpenAI:
    """An SDK client that opens a new connection per request, so the kernel spreads them."""
    limits = httpx.Limits(max_keepalive_connections=0)
    return gateway.client(http_client=openai.DefaultAsyncHttpxClient(limits=limits))


async def send(client: openai.AsyncOpenAI, count: int) -> None:
    for _ in range(count):
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert completion.choices[0].message.content == "count me"


async def requests_total(url: str) -> float:
    status, text = await get_fresh(url + "/metrics")
    assert status == 200
    return metric_sum(text, "gateway_requests_total", route="chat.completions")


async def test_two_workers_share_one_port_and_metrics_sum_across_them(tmp_path):
    config = demo_config(free_port(), workers=2)
    async with gateway_process(config, tmp_path) as gateway:
        pids = {event["pid"] for event in gateway.named("gateway_started")}
        assert len(pids) == 2
        await send(fresh_connection_client(gateway), 40)
        # Every scrape lands on one worker; each must report the sum over both.
        for _ in range(6):
            assert await requests_total(gateway.url) == 40


async def test_a_crashed_worker_is_replaced_and_its_counts_are_kept(tmp_path):
    config = demo_config(free_port(), workers=2)
    async with gateway_process(config, tmp_path) as gateway:
        await send(fresh_connection_client(gateway), 20)
        victim = gateway.named("gateway_started")[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        await gateway.wait_for_event("worker_exited")
        await gateway.wait_for_event("gateway_started", count=3, within=60)
        pids = {event["pid"] for event in gateway.named("gateway_started")}
        assert victim in pids and len(pids) == 3
        await send(fresh_connection_client(gateway), 20)
        for _ in range(4):
            assert await requests_total(gateway.url) == 40
        assert gateway.process.returncode is None


async def test_two_workers_stop_cleanly_on_sigterm(tmp_path):
    config = demo_config(free_port(), workers=2, shutdown_timeout=5)
    async with gateway_process(config, tmp_path) as gateway:
        gateway.signal(signal.SIGTERM)
        assert await gateway.wait_exit(15) == 0
        assert gateway.named("workers_stopped")[0]["codes"] == [0, 0]


LIMIT = 12
ATTEMPTS = 30


@pytest.mark.skipif(
    importlib.util.find_spec("gateway.stages.rate_limit") is None,
    reason="needs the RateLimit stage (issue: rate limits) wired into build_stages",
)
async def test_three_gateways_sharing_redis_hold_a_global_limit_exactly(tmp_path, redis_server):
    limits = {"enabled": True, "backend": "redis", "global": {"requests_per_minute": LIMIT}}
    configs = []
    for _ in range(3):
        config = demo_config(free_port())
        config.update(redis={"url": redis_server.url}, limits=limits)
        configs.append(config)
    if time.time() % 60 > 50:  # keep a fixed-window limiter away from a minute boundary
        await asyncio.sleep(61 - time.time() % 60)
    async with (
        gateway_process(configs[0], tmp_path) as first,
        gateway_process(configs[1], tmp_path) as second,
        gateway_process(configs[2], tmp_path) as third,
    ):
        clients = [g.client() for g in (first, second, third)]
        results = await asyncio.gather(
            *(attempt(clients[i % 3]) for i in range(ATTEMPTS)), return_exceptions=True
        )
    allowed = [r for r in results if r == "ok"]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(allowed) == LIMIT
    assert len(limited) == ATTEMPTS - LIMIT


async def attempt(client: openai.AsyncOpenAI) -> str:
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    return "ok"
