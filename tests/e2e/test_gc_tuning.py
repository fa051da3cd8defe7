"""`server.gc_threshold` and `server.gc_freeze` on a real `gateway serve` process.

The garbage collector's own counters, read from /metrics, show the setting at work: the same
traffic costs a tuned gateway a small fraction of the young-generation collections it costs
one left at the interpreter's defaults.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from tests.e2e.processes import (
    GatewayProcess,
    demo_config,
    free_port,
    gateway_process,
    get_fresh,
    metric_sum,
)

pytestmark = pytest.mark.slow
REQUESTS = 600
IN_FLIGHT = 24


async def young_collections(gateway: GatewayProcess) -> float:
    status, text = await get_fresh(gateway.url + "/metrics")
    assert status == 200
    return metric_sum(text, "python_gc_collections_total", generation="0")


async def drive(gateway: GatewayProcess) -> list[str]:
    """Sends REQUESTS chat completions, IN_FLIGHT at a time; returns the replies' texts."""
    client = gateway.client()
    pending = iter(range(REQUESTS))
    replies: list[str] = []

    async def worker() -> None:
        for index in pending:
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"request {index}"}]
            )
            replies.append(completion.choices[0].message.content or "")

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return replies


async def collections_under_load(tmp_path: Any, **server: Any) -> tuple[dict[str, Any], float]:
    async with gateway_process(demo_config(free_port(), **server), tmp_path) as gateway:
        before = await young_collections(gateway)
        replies = await drive(gateway)
        after = await young_collections(gateway)
        (started,) = gateway.named("gateway_started")
    assert sorted(replies) == sorted(f"request {i}" for i in range(REQUESTS))
    return started, after - before


async def test_tuned_collector_runs_far_less_often_than_the_interpreters_default(tmp_path):
    tuned, tuned_runs = await collections_under_load(tmp_path)
    default, default_runs = await collections_under_load(tmp_path, gc_threshold=0, gc_freeze=False)

    assert tuned["gc_threshold"] == 10_000
    assert tuned["gc_frozen_objects"] > 10_000  # modules, config, policies: built at startup
    assert default["gc_threshold"] == gc.get_threshold()[0]  # the interpreter's own
    assert default["gc_frozen_objects"] == 0
    assert default_runs >= 10
    assert tuned_runs * 5 <= default_runs


async def test_configured_threshold_is_applied(tmp_path):
    async with gateway_process(demo_config(free_port(), gc_threshold=2500), tmp_path) as gateway:
        (started,) = gateway.named("gateway_started")
        assert started["gc_threshold"] == 2500
        assert started["gc_frozen_objects"] > 10_000
