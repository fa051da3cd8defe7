"""The anomaly store's read on a connection of its own (`gateway.redis_line`), against a real
redis-server: a stalled or restarted Redis fails the batch as `ServiceUnavailableError`, and
the next batch reads the right reply on a fresh connection."""

from __future__ import annotations

import os
import signal

import pytest

from gateway.anomaly_redis import RedisStore
from gateway.anomaly_state import Step, Visit
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
