"""Rate limits, token budgets and concurrency across two gateways sharing a real redis-server,
seen through the openai SDK, with Redis killed and restarted mid-test."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import redis.asyncio as aioredis

from gateway.tokens import count_prompt
from tests.conftest import base_config
from tests.fakes.upstream import FakeProvider, Fault

MESSAGES = [{"role": "user", "content": "how many tokens is this"}]


def limited(provider, redis_url, tier, **limits):
    settings = {"enabled": True, "tiers": {"t": tier}, "assignment": {"default_tier": "t"},
                **limits}  # fmt: skip
    return base_config(provider, redis={"url": redis_url}, limits=settings)


async def ask(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    return await client.chat.completions.create(model="gpt-4o-mini", **kwargs)


async def budget_used(redis_url: str) -> int:
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match="*:key:*:d2*")]
        values = [await client.get(k) for k in keys]
        return sum(int(v) for v in values)
    finally:
        await client.aclose()


async def test_two_gateways_admit_exactly_n_of_3n_requests(provider, start_gateway, redis_server):
    n = 6
    config = limited(provider, redis_server.url, {"requests_per_minute": n})
    first, second = await start_gateway(config), await start_gateway(config)
    clients = [first.client(), second.client()]
    results = await asyncio.gather(
        *(ask(clients[i % 2]) for i in range(3 * n)), return_exceptions=True
    )
    passed = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert (len(passed), len(refused)) == (n, 2 * n)
    assert len(provider.control.received) == n
    assert refused[0].code == "rate_limit_exceeded"
    assert 1 <= int(refused[0].response.headers["retry-after"]) <= 10


async def test_budget_holds_exactly_the_usage_the_provider_reported(
    provider, start_gateway, redis_server
):
    config = limited(provider, redis_server.url,
                     {"tokens_per_minute": 100_000, "daily_tokens": 1_000_000})  # fmt: skip
    first, second = await start_gateway(config), await start_gateway(config)
    plain = await ask(first.client())
    reported = plain.usage.total_tokens
    stream = await ask(second.client(), stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    reported += chunks[-1].usage.total_tokens
    hidden = await ask(first.client(), stream=True)  # same prompt and echo: same usage as `plain`
    hidden_chunks = [chunk async for chunk in hidden]
    reported += plain.usage.total_tokens
    assert all(chunk.usage is None for chunk in hidden_chunks)
    assert provider.last["stream_options"] == {"include_usage": True}
    assert await budget_used(redis_server.url) == reported


async def test_a_whole_answer_no_longer_holds_its_slot_on_any_replica(
    provider, start_gateway, redis_server
):
    config = limited(provider, redis_server.url, {"concurrent": 1})
    first, second = await start_gateway(config), await start_gateway(config)
    clients = [first.client(), second.client()]
    for i in range(10):  # each answer comes once Redis holds its settlement
        assert (await ask(clients[i % 2])).choices[0].message.content


async def test_a_stream_over_its_budget_is_cut_at_the_budget(provider, start_gateway, redis_server):
    prompt = count_prompt("chat.completions", {"messages": MESSAGES})
    allowance = 5
    config = limited(provider, redis_server.url, {"daily_tokens": prompt + allowance})
    gateway = await start_gateway(config)
    provider.reply("x" * 200, ["x" * 8] * 25)
    stream = await ask(gateway.client(), stream=True, max_tokens=100)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "x" * (allowance * 4)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert provider.last["max_tokens"] == allowance  # the provider was told the budget too
    assert await budget_used(redis_server.url) == prompt + allowance
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(gateway.client())
    assert refused.value.code == "insufficient_quota"


async def test_concurrent_streams_are_limited_until_they_end(start_gateway, redis_server):
    from gateway.config import DemoSettings

    slow = await FakeProvider(DemoSettings(chunk_delay_ms=40, chunk_chars=2)).start()
    try:
        config = limited(slow, redis_server.url, {"concurrent": 2})
        first, second = await start_gateway(config), await start_gateway(config)
        streams = [await ask(first.client(), stream=True),
                   await ask(second.client(), stream=True)]  # fmt: skip
        for stream in streams:
            await stream.__anext__()
        with pytest.raises(openai.RateLimitError):
            await ask(first.client())
        for stream in streams:
            async for _ in stream:
                pass
        assert (await ask(second.client())).choices[0].message.content
    finally:
        await slow.stop()


async def test_dead_redis_fails_closed_with_503_and_shared_limits_resume(
    provider, start_gateway, redis_server
):
    breaker = {"failures": 1, "open_seconds": 0.2}
    config = limited(provider, redis_server.url, {"requests_per_minute": 3},
                     failure_mode="closed", breaker=breaker)  # fmt: skip
    first, second = await start_gateway(config), await start_gateway(config)
    await ask(first.client())
    redis_server.stop()
    for _ in range(3):
        with pytest.raises(openai.InternalServerError) as failed:
            await asyncio.wait_for(ask(second.client()), 2)
        assert failed.value.status_code == 503
    await redis_server.restart()
    await asyncio.sleep(0.25)  # the breaker's open time: the next call is its one trial
    await asyncio.wait_for(ask(first.client()), 2)  # Redis lost its data: a fresh window
    await asyncio.sleep(0.25)
    await asyncio.wait_for(ask(second.client()), 2)  # the other replica's breaker closes too
    answers = await asyncio.gather(
        *(asyncio.wait_for(ask(c), 2) for c in [first.client(), second.client()] * 2),
        return_exceptions=True,
    )
    assert sum(not isinstance(a, BaseException) for a in answers) == 1  # shared again: 3 in all
    assert sum(isinstance(a, openai.RateLimitError) for a in answers) == 3


async def test_limits_hold_after_redis_forgets_its_scripts(provider, start_gateway, redis_server):
    config = limited(provider, redis_server.url, {"requests_per_minute": 2})
    gateway = await start_gateway(config)
    await ask(gateway.client())
    client = aioredis.from_url(redis_server.url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    await ask(gateway.client())  # NOSCRIPT: the gateway loads the script again
    with pytest.raises(openai.RateLimitError):
        await ask(gateway.client())


async def test_dead_redis_fails_open_to_local_limits(provider, start_gateway, redis_server):
    config = limited(provider, redis_server.url, {"requests_per_minute": 2},
                     failure_mode="open", breaker={"failures": 1, "open_seconds": 30})  # fmt: skip
    gateway = await start_gateway(config)
    redis_server.stop()
    client = gateway.client()
    await asyncio.wait_for(ask(client), 2)
    await asyncio.wait_for(ask(client), 2)
    with pytest.raises(openai.RateLimitError):
        await asyncio.wait_for(ask(client), 2)


async def test_the_sdk_sees_the_headers_and_retries_after_retry_after(
    provider, start_gateway, redis_server
):
    config = limited(provider, redis_server.url,
                     {"requests_per_second": 1, "tokens_per_minute": 50_000})  # fmt: skip
    gateway = await start_gateway(config)
    raw = await gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert raw.headers["x-ratelimit-reset-requests"] in ("1s", *(f"{ms}ms" for ms in range(1000)))
    assert raw.headers["x-ratelimit-limit-tokens"] == "50000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 50_000
    retried = await ask(gateway.client(max_retries=1))
    assert retried.choices[0].message.content == MESSAGES[0]["content"]
    assert len(provider.control.received) == 2


async def test_an_upstream_failure_costs_no_tokens(provider, start_gateway, redis_server):
    config = limited(provider, redis_server.url, {"daily_tokens": 10_000})
    gateway = await start_gateway(config)
    provider.fail(Fault(status=500))
    with pytest.raises(openai.InternalServerError):
        await ask(gateway.client())
    assert await budget_used(redis_server.url) == 0
    assert json.dumps(provider.last["messages"]) == json.dumps(MESSAGES)
