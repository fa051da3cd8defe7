"""The anomaly store's calls on a connection of its own (`gateway.redis_line`), against a real
redis-server: a stalled or restarted Redis fails the batch as `ServiceUnavailableError`, the
next batch reads the right reply on a fresh connection, and a batch's write keeps the state's
format."""

from __future__ import annotations

import os
import signal

import pytest
import redis.asyncio as aioredis

from gateway.anomaly_redis import RedisStore
from gateway.anomaly_state import Baseline, Claim, Save, Step, Visit
from gateway.config import RedisSettings
from gateway.errors import ServiceUnavailableError

T0 = 1714554000.0


def step(at: float) -> Step:
    """One request of `principal:ps_alice`, counting its tokens."""
    visit = Visit("principal:ps_alice", {"requests": 1.0, "tokens": 10.0})
    return Step((visit,), int(at // 60), int(at // 3600) % 24, at)


async def requests_counted(store: RedisStore, at: float) -> float:
    [reading] = await store.read([step(at)])
    return reading.visited[0].rolled.current["requests"]


async def test_a_stalled_redis_fails_the_read_and_the_next_read_is_answered(redis_server):
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=0.2, connect_timeout=0.2))
    assert await requests_counted(store, T0) == 1
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ServiceUnavailableError):
            await requests_counted(store, T0 + 1)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    # The stalled read still ran once Redis went on: its reply must not reach this read.
    assert await requests_counted(store, T0 + 2) == 3
    await store.close()


async def test_a_restarted_redis_is_read_again_on_a_new_connection(redis_server):
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=1.0))
    assert await requests_counted(store, T0) == 1
    await redis_server.restart()
    assert await requests_counted(store, T0 + 1) == 1, "a fresh Redis: state starts afresh"
    await store.close()


async def test_a_batch_write_keeps_the_state_format_replicas_share(redis_server):
    """Baselines as the minute hash's fields (reprs), a won claim as the time its cooldown
    ends, expiring a minute after it; a claim within the cooldown is lost."""
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=1.0), prefix="f:")
    save = Save("principal:a", {"tokens": Baseline(1234.5678901234, 12.345678901, 7)}, 9)
    claims = [Claim("tokens_per_minute:principal:a", 1796031554.1074963, 600.0),
              Claim("tokens_per_minute:principal:a", 1796031600.0, 600.0)]  # fmt: skip
    assert await store.write([save], claims) == [True, False]
    client = aioredis.Redis.from_url(redis_server.url)
    assert await client.hgetall("f:m:principal:a") == {
        b"history": b"9", b"e:tokens": b"1234.5678901234", b"d:tokens": b"12.345678901",
        b"n:tokens": b"7"}  # fmt: skip
    claim = "f:c:tokens_per_minute:principal:a"
    assert await client.get(claim) == b"1796032154.1074963"
    assert 600 < await client.ttl(claim) <= 660
    await client.aclose()
    await store.close()
