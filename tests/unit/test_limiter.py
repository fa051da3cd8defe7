"""The limit algorithms on both backends (a real redis-server and memory), with a fake clock,
and the limiter's circuit breaker and failure modes."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.asyncio.connection import Connection

from gateway import metrics
from gateway.config import LimitSettings, LimitValues, RedisSettings
from gateway.errors import ServiceUnavailableError
from gateway.limit_breaker import Breaker
from gateway.limit_script import BATCH_SHA, Batch, Encoding
from gateway.limiter import BATCH_SIZE, Limiter, RedisBackend, _evalsha_command
from gateway.limits import Ask, Limit, MemoryBackend, limits_for

T0 = 1_750_000_000_000.0  # ms; a fixed "now" injected into both backends


def rate(limit: int, window_ms: int = 60_000, *, kind: str = "r", key: str = "k") -> Limit:
    return Limit("requests_per_minute", "key", f"{key}:{kind}", kind, limit, window_ms)


def budget(limit: int, key: str = "k") -> Limit:
    return Limit("daily_tokens", "key", f"{key}:b", "b", limit, 3_600_000)


def slots(limit: int, lease_ms: int = 10_000, key: str = "k") -> Limit:
    return Limit("concurrent", "key", f"{key}:c", "c", limit, lease_ms)


def ask(*limits: Limit, tokens: int = 0, least: int = 0) -> Ask:
    return Ask(uuid.uuid4().hex, limits, tokens, least)


@pytest.fixture(params=["memory", "redis"])
async def backend(request, redis_server):
    if request.param == "memory":
        yield MemoryBackend()
        return
    redis = RedisBackend(RedisSettings(url=redis_server.url), "test:" + uuid.uuid4().hex[:8])
    yield redis
    await redis.close()


@pytest.fixture
async def open_backend(redis_server) -> AsyncIterator[Callable[[str], RedisBackend]]:
    """Opens Redis backends on the private server under a key prefix; closes them after."""
    opened: list[RedisBackend] = []

    def open_(prefix: str) -> RedisBackend:
        opened.append(RedisBackend(RedisSettings(url=redis_server.url), prefix))
        return opened[-1]

    yield open_
    for backend in opened:
        await backend.close()


async def test_request_rate_allows_the_burst_then_one_per_interval(backend):
    limit = rate(3)
    results = [await backend.reserve(ask(limit), T0) for _ in range(4)]
    assert [d.allowed for d in results] == [True, True, True, False]
    assert results[3].retry_ms == 20_000
    assert [d.standings[0].remaining for d in results[:3]] == [2, 1, 0]
    assert not (await backend.reserve(ask(limit), T0 + 19_999)).allowed
    assert (await backend.reserve(ask(limit), T0 + 20_000)).allowed


async def test_a_request_one_ms_past_its_turn_passes(backend):
    limit = rate(2, 2000)
    await backend.reserve(ask(limit), T0)
    await backend.reserve(ask(limit), T0)
    assert (await backend.reserve(ask(limit), T0 + 999)).retry_ms == 1
    assert (await backend.reserve(ask(limit), T0 + 1001)).allowed


async def test_a_refused_request_costs_nothing(backend):
    own, shared = rate(5, key="own"), rate(1, key="all")
    assert (await backend.reserve(ask(own, shared), T0)).allowed
    refused = await backend.reserve(ask(own, shared), T0)
    assert not refused.allowed and refused.blocked == shared
    assert refused.standings[0].remaining == 4  # the key's limit was not charged
    alone = await backend.reserve(ask(own), T0)
    assert alone.standings[0].remaining == 3


async def test_budget_grants_what_is_left_then_refuses(backend):
    limit = budget(100)
    first = await backend.reserve(ask(limit, tokens=80, least=10), T0)
    second = await backend.reserve(ask(limit, tokens=80, least=10), T0)
    third = await backend.reserve(ask(limit, tokens=80, least=10), T0)
    assert (first.granted, second.granted) == (80, 20)
    assert not third.allowed and third.blocked == limit and third.retry_ms == -1


async def test_settling_charges_exactly_the_tokens_used(backend):
    tokens, limit = rate(600, kind="t"), budget(1000)
    first = await backend.reserve(ask(tokens, limit, tokens=500, least=1), T0)
    await backend.settle(first.reservation, 123, T0)
    rest = await backend.reserve(ask(limit, tokens=10_000, least=1), T0)
    assert rest.granted == 1000 - 123
    assert (await backend.reserve(ask(tokens, tokens=477, least=1), T0)).allowed
    assert not (await backend.reserve(ask(tokens, tokens=1, least=1), T0)).allowed


async def test_settling_more_than_reserved_charges_the_excess(backend):
    limit = budget(1000)
    first = await backend.reserve(ask(limit, tokens=100, least=1), T0)
    await backend.settle(first.reservation, 400, T0)
    assert (await backend.reserve(ask(limit, tokens=10_000, least=1), T0)).granted == 600


async def test_a_request_larger_than_the_token_rate_can_never_pass(backend):
    limit = rate(100, kind="t")
    decision = await backend.reserve(ask(limit, tokens=200, least=1), T0)
    assert not decision.allowed and decision.retry_ms == -1 and decision.blocked == limit


async def test_concurrency_slots_are_held_until_settled_or_the_lease_ends(backend):
    limit = slots(2, lease_ms=10_000)
    first = await backend.reserve(ask(limit), T0)
    assert (await backend.reserve(ask(limit), T0)).allowed
    refused = await backend.reserve(ask(limit), T0)
    assert not refused.allowed and refused.retry_ms == 1000
    await backend.settle(first.reservation, 0, T0)
    assert (await backend.reserve(ask(limit), T0)).allowed
    assert not (await backend.reserve(ask(limit), T0 + 9_999)).allowed
    assert (await backend.reserve(ask(limit), T0 + 10_000)).allowed


@pytest.mark.parametrize("largest_group", [1, 6])
async def test_redis_and_memory_decide_alike(largest_group, open_backend):
    """The Lua script and the memory backend are the same algorithm: replay one history.
    Operations sent together in one batch decide as if sent one by one, in order."""
    rng = random.Random(largest_group)
    redis = open_backend(f"parity-{largest_group}")
    memory = MemoryBackend()
    limits = [rate(9), rate(4, 1000), rate(1200, kind="t"), budget(6000), slots(4)]
    now, held = T0, []
    for _ in range(200):
        now += rng.choice([0, 1, 37, 250, 1500])
        size = rng.randrange(1, largest_group + 1)
        group = [_random_operation(rng, limits, held) for _ in range(size)]
        got_redis = await asyncio.gather(*(_apply(redis, op, now) for op in group))
        got_memory = [await _apply(memory, op, now) for op in group]
        for from_redis, from_memory in zip(got_redis, got_memory, strict=True):
            if from_redis is None:
                continue
            assert _outcome(from_redis) == _outcome(from_memory)
            if from_redis.reservation:
                held.append(from_redis.reservation)


def _random_operation(rng, limits, held):
    if held and rng.random() < 0.4:
        return held.pop(rng.randrange(len(held))), rng.randrange(0, 300)
    chosen = tuple(lim for lim in limits if rng.random() < 0.6)
    return ask(*chosen, tokens=rng.randrange(1, 400), least=1), None


async def _apply(backend, operation, now):
    subject, used = operation
    if used is None:
        return await backend.reserve(subject, now)
    await backend.settle(subject, used, now)
    return None


def _outcome(decision):
    return decision.allowed, decision.granted, decision.retry_ms, decision.standings


async def _evalsha_calls(url: str) -> int:
    client = aioredis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_reserves_go_as_one_batch_and_each_gets_its_own_answer(
    redis_server, open_backend
):
    redis = open_backend("batch")
    limit = rate(5)
    await redis.reserve(ask(rate(1, key="warm")), T0)  # the script is loaded
    before = await _evalsha_calls(redis_server.url)
    decisions = await asyncio.gather(*(redis.reserve(ask(limit), T0) for _ in range(8)))
    assert await _evalsha_calls(redis_server.url) - before == 1
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert [d.standings[0].remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    assert {d.retry_ms for d in decisions[5:]} == {12_000}
    before = await _evalsha_calls(redis_server.url)
    settles = (redis.settle(d.reservation, 0, T0) for d in decisions[:5])
    await asyncio.gather(*settles, redis.reserve(ask(limit), T0 + 12_000))
    assert await _evalsha_calls(redis_server.url) - before == 1


async def test_a_full_batch_is_sent_at_once_and_the_rest_follows(redis_server, open_backend):
    redis = open_backend("full")
    limit = rate(BATCH_SIZE)
    await redis.reserve(ask(rate(1, key="warm")), T0)  # the script is loaded
    before = await _evalsha_calls(redis_server.url)
    many = (redis.reserve(ask(limit), T0) for _ in range(BATCH_SIZE + 1))
    decisions = await asyncio.gather(*many)
    assert await _evalsha_calls(redis_server.url) - before == 2
    assert [d.allowed for d in decisions] == [True] * BATCH_SIZE + [False]


async def test_a_flushed_script_cache_reloads_the_script_for_the_whole_batch(
    redis_server, open_backend
):
    redis = open_backend("noscript")
    limit = slots(3)
    assert (await redis.reserve(ask(limit), T0)).allowed
    client = aioredis.from_url(redis_server.url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    before = await _evalsha_calls(redis_server.url)
    decisions = await asyncio.gather(*(redis.reserve(ask(limit), T0) for _ in range(4)))
    assert await _evalsha_calls(redis_server.url) - before == 2  # NOSCRIPT, then the run
    assert [d.allowed for d in decisions] == [True, True, False, False]
    assert [d.standings[0].remaining for d in decisions] == [1, 0, 0, 0]


async def test_a_cancelled_caller_does_not_disturb_the_rest_of_its_batch(open_backend):
    redis = open_backend("cancel")
    limit = rate(10)
    await redis.reserve(ask(rate(1, key="warm")), T0)  # the script is loaded
    tasks = [asyncio.create_task(redis.reserve(ask(limit), T0)) for _ in range(4)]
    await asyncio.sleep(0)  # every task has queued its operation
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    # the others got their answers; the reservation of the one gone was not even sent
    assert [results[i].standings[0].remaining for i in (0, 2, 3)] == [9, 8, 7]


async def test_a_cancelled_settlement_still_frees_its_slot(open_backend):
    redis = open_backend("cancel-settle")
    limit = slots(1)
    held = await redis.reserve(ask(limit), T0)
    settling = asyncio.create_task(redis.settle(held.reservation, 0, T0))
    await asyncio.sleep(0)  # queued
    settling.cancel()
    await asyncio.gather(settling, return_exceptions=True)
    assert (await redis.reserve(ask(limit), T0)).allowed


@pytest.mark.parametrize(("mode", "refused"), [("closed", 5), ("open", 0)])
async def test_a_failed_batch_applies_the_failure_mode_to_every_caller(redis_server, mode, refused):
    limiter = _limiter(redis_server.url, mode)
    counter = metrics.RATELIMIT_FALLBACK.labels("redis_error", "refused" if refused else "memory")
    try:
        await limiter.reserve(ask(rate(100, key=uuid.uuid4().hex)))
        redis_server.stop()
        before = counter._value.get()
        requests = [ask(rate(3, key=uuid.uuid4().hex)) for _ in range(5)]
        results = await asyncio.gather(*map(limiter.reserve, requests), return_exceptions=True)
        assert counter._value.get() - before == 5  # each caller, though one batch failed
        if refused:
            assert all(isinstance(r, ServiceUnavailableError) for r in results)
        else:
            assert all(r.allowed and r.reservation.backend == "memory" for r in results)
        assert limiter.breaker.is_open
    finally:
        await limiter.close()


def test_the_batch_command_goes_on_the_wire_as_redis_py_packs_it():
    keys, argument = ["{t}:k:r", "{tö}:k:c"], "r - id 1 1 1 1 r 5 60000;" * 400
    packed = Connection().pack_command("EVALSHA", BATCH_SHA, len(keys), *keys, argument)
    assert _evalsha_command(keys, argument) == b"".join(packed)


async def test_a_dropped_connection_is_retried_once_on_a_new_one(redis_server, open_backend):
    redis = open_backend("dropped")
    limit = rate(10)
    assert (await redis.reserve(ask(limit), T0)).allowed
    client = aioredis.from_url(redis_server.url)
    try:
        await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        await client.aclose()
    assert (await redis.reserve(ask(limit), T0)).standings[0].remaining == 8


async def test_a_stalled_redis_fails_within_the_command_timeout(redis_server):
    settings = RedisSettings(url=redis_server.url, timeout=0.3, connect_timeout=5.0)
    redis = RedisBackend(settings, "stalled")
    client = aioredis.from_url(redis_server.url)
    try:
        await redis.reserve(ask(rate(10)), T0)  # connected, the script loaded
        await client.execute_command("CLIENT", "PAUSE", "2000", "ALL")
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError):
            await redis.reserve(ask(rate(10)), T0)
        assert time.monotonic() - started < 2.0  # the command timeout, not the whole deadline
    finally:
        await client.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()
        await redis.close()


async def test_a_batch_sends_each_key_once_and_encodes_limits_again_only_at_new_indexes():
    loop = asyncio.get_running_loop()
    first = Encoding("{t}:", (rate(5), slots(2)))
    other = Encoding("{t}:", (rate(5), rate(9, key="x")))
    batch = Batch(loop, 0)
    words = batch.words_of(first)
    assert words == "2 1 r 5 60000 2 c 2 10000"
    assert batch.words_of(first) is words
    assert batch.words_of(other) == "2 1 r 5 60000 3 r 9 60000"  # k:r keeps its index
    assert list(batch.slots) == ["{t}:k:r", "{t}:k:c", "{t}:x:r"]
    assert Batch(loop, 1).words_of(first) is words  # the same indexes: not encoded again
    fresh = Batch(loop, 2)
    assert fresh.words_of(other) == "2 1 r 5 60000 2 r 9 60000"  # indexes are per batch
    assert fresh.words_of(first) == "2 1 r 5 60000 3 c 2 10000"
    assert fresh.words_of(Encoding("{t}:", ())) == "0 "  # no limits (as no indexes) is encoded too


async def test_limits_reused_across_batches_at_other_indexes_count_their_own_keys(open_backend):
    redis = open_backend("reused")
    a, b = (rate(10, key="a"),), (rate(10, key="b"), rate(10, key="a"))
    await asyncio.gather(redis.reserve(Ask("1", a), T0), redis.reserve(Ask("2", b), T0))
    # one batch again, now with b's keys first: a:r goes from index 1 to 2
    again = await asyncio.gather(redis.reserve(Ask("3", b), T0), redis.reserve(Ask("4", a), T0))
    assert [s.remaining for s in again[0].standings] == [8, 7]
    assert [s.remaining for s in again[1].standings] == [6]


async def test_limits_are_built_once_per_dimension_but_budgets_follow_the_clock():
    now = [T0 / 1000]
    settings = LimitSettings(enabled=True, backend="memory")
    limiter = Limiter(settings, RedisSettings(), clock=lambda: now[0])
    rates, other = LimitValues(requests_per_minute=5), LimitValues(requests_per_minute=6)
    first = limiter.limits_for(rates, "key", "alice")
    assert limiter.limits_for(rates, "key", "alice") is first
    assert limiter.limits_for(other, "key", "alice")[0].limit == 6  # the values changed
    daily = LimitValues(daily_tokens=100)
    before = limiter.limits_for(daily, "key", "alice")[0].window_ms
    now[0] += 60
    assert limiter.limits_for(daily, "key", "alice")[0].window_ms == before - 60_000


def test_request_ids_are_unique_within_and_across_limiters():
    settings = LimitSettings(enabled=True, backend="memory")
    first, second = Limiter(settings, RedisSettings()), Limiter(settings, RedisSettings())
    ids = [first.request_id() for _ in range(1000)] + [second.request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert not any(" " in rid or ";" in rid for rid in ids)  # the script's separators


def test_limits_for_names_every_configured_limit_and_hides_the_subject():
    values = LimitValues(requests_per_second=1, tokens_per_minute=10, concurrent=2,
                         daily_tokens=5, monthly_tokens=50)  # fmt: skip
    found = limits_for(values, "key", "alice@example.test", now=T0 / 1000, lease_ms=1000)
    names = ["requests_per_second", "tokens_per_minute", "concurrent", "daily_tokens",
             "monthly_tokens"]  # fmt: skip
    assert [lim.name for lim in found] == names
    assert all("alice" not in lim.key for lim in found)
    assert found[3].key.endswith(":d20250615") and found[4].key.endswith(":m202506")


def test_breaker_opens_after_failures_and_lets_one_trial_through():
    now = [0.0]
    breaker = Breaker(2, 5.0, lambda: now[0])
    breaker.failed()
    assert breaker.allows()
    breaker.failed()
    assert not breaker.allows()
    now[0] = 5.0
    assert breaker.allows()
    assert not breaker.allows()  # only one trial at a time
    breaker.succeeded()
    assert breaker.allows() and not breaker.is_open


def _limiter(url: str, mode: str) -> Limiter:
    settings = LimitSettings(enabled=True, backend="redis", failure_mode=mode,
                             breaker={"failures": 2, "open_seconds": 0.2})  # fmt: skip
    return Limiter(settings, RedisSettings(url=url, timeout=0.2, connect_timeout=0.2))


def _settle_count() -> float:
    labels = {"backend": "redis", "operation": "settle"}
    return REGISTRY.get_sample_value("gateway_ratelimit_seconds_count", labels) or 0.0


async def test_a_settlement_ends_when_its_batch_is_answered(redis_server):
    limiter = _limiter(redis_server.url, "closed")
    limit = slots(1, key=uuid.uuid4().hex)
    try:
        held = await limiter.reserve(ask(limit))
        before = _settle_count()
        settling = limiter.settle(held.reservation, 0)
        assert settling is not None and not settling.done()  # queued in the next batch
        await settling
        assert (await limiter.reserve(ask(limit))).allowed  # Redis freed the slot
        assert _settle_count() - before == 1  # its time was observed when its batch answered
        assert not limiter.breaker.is_open
    finally:
        await limiter.close()


async def test_settlements_of_a_failed_batch_end_quietly_and_count_for_the_breaker(redis_server):
    limiter = _limiter(redis_server.url, "open")  # opens after two failures
    limit = slots(5, key=uuid.uuid4().hex)
    try:
        held = [await limiter.reserve(ask(limit)) for _ in range(2)]
        redis_server.stop()
        settling = [limiter.settle(decision.reservation, 0) for decision in held]
        assert await asyncio.gather(*settling) == [None, None]  # the request does not fail
        assert limiter.breaker.is_open  # one failed batch, two settlements: two failures
    finally:
        await limiter.close()


async def test_dead_redis_fails_closed_then_the_breaker_answers_without_calling(redis_server):
    limiter = _limiter(redis_server.url, "closed")
    request = ask(rate(100, key=uuid.uuid4().hex))
    try:
        assert (await limiter.reserve(request)).reservation.backend == "redis"
        redis_server.stop()
        fast = metrics.RATELIMIT_FALLBACK.labels("breaker_open", "refused")
        before = fast._value.get()
        for _ in range(4):
            with pytest.raises(ServiceUnavailableError):
                await limiter.reserve(request)
        assert limiter.breaker.is_open
        assert fast._value.get() - before == 2  # after two failures, no more Redis calls
        assert await limiter.check_ready() is not None
    finally:
        await limiter.close()


async def test_dead_redis_fails_open_to_memory_and_recovers(redis_server):
    limiter = _limiter(redis_server.url, "open")
    limit = rate(100, key=uuid.uuid4().hex)
    try:
        redis_server.stop()
        decision = await limiter.reserve(ask(limit))
        assert decision.allowed and decision.reservation.backend == "memory"
        await redis_server.restart()
        for _ in range(50):
            decision = await limiter.reserve(ask(limit))
            if decision.reservation.backend == "redis":
                break
            await asyncio.sleep(0.05)
        assert decision.reservation.backend == "redis"
        assert not limiter.breaker.is_open
    finally:
        await limiter.close()


async def test_a_cluster_client_that_cannot_reach_a_cluster_fails_closed(redis_server):
    """A Cluster-mode client pointed at a standalone server raises redis-py's cluster error
    (not a RedisError); the limiter must still turn it into its failure mode."""
    settings = LimitSettings(enabled=True, backend="redis", failure_mode="closed")
    redis = RedisSettings(url=redis_server.url, mode="cluster", timeout=0.5, connect_timeout=0.5)
    limiter = Limiter(settings, redis)
    try:
        with pytest.raises(ServiceUnavailableError):
            await limiter.reserve(ask(rate(100, key=uuid.uuid4().hex)))
        assert await limiter.check_ready() is not None
    finally:
        await limiter.close()
