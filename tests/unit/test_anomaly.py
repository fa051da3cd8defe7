"""Anomaly detection: robust baselines, rule detectors, cooldowns, the queue, batches, and
shared Redis state (exactly as in memory, in two round trips per batch)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gateway import anomaly_state
from gateway.anomaly import Anomaly, AnomalyDetector, fold, scale
from gateway.anomaly_batch import minute_counts, new_members, plan
from gateway.anomaly_redis import RedisStore
from gateway.anomaly_state import (
    METRICS,
    Baseline,
    MemoryStore,
    Observation,
    Rolled,
    Step,
    Visit,
    Visited,
)
from gateway.config import AnomalySettings, RedisSettings
from gateway.errors import ServiceUnavailableError
from tests.conftest import free_port

T0 = 1714554000.0  # 2024-05-01 09:00:00 UTC
TEAM = [("ps_alice", "acme"), ("ps_bob", "acme"), ("ps_carol", "acme"), ("ps_dave", "globex")]
ADDRESS = "198.51.100.0/24"
T = TypeVar("T")


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def store_url(request) -> str | None:
    """None for the in-memory store, else the URL of a private real redis-server."""
    return None if request.param == "memory" else request.getfixturevalue("redis_server").url


@pytest.fixture
async def store(store_url):
    settings = RedisSettings(url=store_url, timeout=1.0)
    chosen = MemoryStore() if store_url is None else RedisStore(settings)
    yield chosen
    await chosen.close()


def detector_with(store, **settings) -> tuple[AnomalyDetector, list[Anomaly]]:
    raised: list[Anomaly] = []
    detector = AnomalyDetector(AnomalySettings(**settings), store, raised.append, clock=Clock())
    return detector, raised


def request(at: float, principal: str, tenant: str, **fields) -> Observation:
    fields.setdefault("model", "gpt-4o-mini")
    fields.setdefault("endpoint", "chat.completions")
    fields.setdefault("tokens", 250)
    return Observation(at=at, principal=principal, tenant=tenant, **fields)


async def steady_minute(detector, minute: int, rng: random.Random, spike: str | None = None):
    """Four requests per identity, ~250 tokens each; `spike` sends ten times the tokens."""
    for slot in range(4):
        for principal, tenant in TEAM:
            tokens = rng.randint(240, 260) * (10 if principal == spike else 1)
            at = T0 + minute * 60 + slot * 15 + rng.random()
            await detector.observe(request(at, principal, tenant, tokens=tokens))


def summary(raised: list[Anomaly]) -> list[tuple[str, str, str, int]]:
    return sorted((a.detector, a.kind, a.identity, int((a.at - T0) // 60)) for a in raised)


async def test_traffic_scenario_raises_exactly_the_expected_anomalies(store):
    detector, raised = detector_with(store)
    rng = random.Random(3)
    for minute in range(20):
        await steady_minute(detector, minute, rng)
    assert raised == [], "no anomaly during the steady baseline"

    for minute in range(20, 28):  # bob's token volume jumps tenfold for 8 minutes
        await steady_minute(detector, minute, rng, spike="ps_bob")
        if minute < 26:  # carol tries a prompt injection every minute
            at = T0 + minute * 60 + 50
            await detector.observe(request(at, "ps_carol", "acme", status=400, violations=1,
                                           injection_blocks=1, tokens=0))  # fmt: skip
        if minute == 22:  # one address fails to log in fifteen times with varied keys
            for attempt in range(15):
                await detector.observe(Observation(
                    at=T0 + minute * 60 + attempt, address=ADDRESS, status=401,
                    credential=f"kf_{attempt:024x}", endpoint="chat.completions",
                ))  # fmt: skip
    for minute in range(28, 36):
        await steady_minute(detector, minute, rng)
    for attempt in range(15):  # after the cooldown the same address tries again
        at = T0 + 36 * 60 + attempt
        await detector.observe(Observation(at=at, address=ADDRESS, status=401))

    assert summary(raised) == [
        ("auth_failure_burst_address", "address", ADDRESS, 22),
        ("auth_failure_burst_address", "address", ADDRESS, 36),
        ("prompt_injection_repeated", "principal", "ps_carol", 22),
        ("tokens_per_minute", "principal", "ps_bob", 20),
        ("tokens_per_minute", "tenant", "acme", 20),
    ]
    bob = next(a for a in raised if a.identity == "ps_bob")
    assert bob.observed > 2 * bob.baseline and bob.score >= 6 and bob.severity in {"medium", "high"}


async def test_a_burst_against_one_key_from_many_addresses_is_raised(store):
    detector, raised = detector_with(store, auth_failures=5)
    for attempt in range(8):
        address = f"203.0.{attempt}.0/24"
        await detector.observe(Observation(at=T0 + attempt, address=address, status=401,
                                           credential="key_7"))  # fmt: skip
    assert summary(raised) == [("auth_failure_burst_credential", "credential", "key_7", 0)]


async def test_failures_spread_wider_than_the_window_are_not_a_burst(store):
    detector, raised = detector_with(store, auth_failures=5, auth_window=60)
    for attempt in range(10):
        await detector.observe(Observation(at=T0 + attempt * 20, address=ADDRESS, status=401))
    assert raised == []


async def test_a_canary_leak_is_critical_at_once(store):
    detector, raised = detector_with(store)
    await detector.observe(request(T0, "ps_alice", "acme", canary_leak=True))
    assert [(a.detector, a.severity, a.identity) for a in raised] == [
        ("canary_leak", "critical", "ps_alice")
    ]


async def test_first_use_of_a_model_or_endpoint_counts_only_after_a_history(store):
    detector, raised = detector_with(store, min_history=3)
    await detector.observe(request(T0, "ps_new", "acme", model="fast"))
    assert raised == [], "a new identity has no history to differ from"
    for minute in range(1, 5):
        await detector.observe(request(T0 + minute * 60, "ps_new", "acme"))
    await detector.observe(request(T0 + 300, "ps_new", "acme", model="o1", endpoint="responses"))
    assert summary(raised) == [
        ("first_endpoint_use", "principal", "ps_new", 5),
        ("first_endpoint_use", "tenant", "acme", 5),
        ("first_model_use", "principal", "ps_new", 5),
        ("first_model_use", "tenant", "acme", 5),
    ]


async def test_activity_at_an_unusual_hour_is_raised_once_history_spans_days(store):
    detector, raised = detector_with(store, hour_min_days=2, first_use=False, min_history=1000)
    for day in range(3):
        for hour in (9, 10, 11):
            for minute in range(0, 60, 10):
                at = T0 + day * 86400 + (hour - 9) * 3600 + minute * 60
                await detector.observe(request(at, "ps_alice", "acme"))
    assert raised == []
    await detector.observe(request(T0 + 3 * 86400 + 17 * 3600, "ps_alice", "acme"))
    assert {(a.detector, a.kind) for a in raised} == {
        ("unusual_hour", "principal"),
        ("unusual_hour", "tenant"),
    }


def test_outliers_are_clipped_so_they_do_not_become_the_baseline():
    settings = AnomalySettings()
    base = Baseline(1000.0, 10.0, 30)
    after = fold(base, 100_000.0, settings, "tokens")
    assert after.mean < 1200 and after.count == 31


async def test_submit_never_waits_and_a_full_queue_drops_and_counts():
    detector, raised = detector_with(MemoryStore(), queue_size=2)
    before = REGISTRY.get_sample_value("gateway_anomaly_dropped_total") or 0
    for index in range(3):
        detector.submit(request(T0 + index, "ps_alice", "acme", canary_leak=True))
    assert REGISTRY.get_sample_value("gateway_anomaly_dropped_total") == before + 1
    detector.start()
    await detector.drain()
    assert [a.detector for a in raised] == ["canary_leak"]
    await detector.close()


@pytest.mark.parametrize("mode", ["standalone", "cluster"])
async def test_redis_errors_are_translated_and_the_consumer_keeps_going(redis_server, mode):
    # standalone: nothing listens; cluster: a standalone server answers a Cluster client,
    # which raises redis-py's cluster error (not a RedisError)
    url = f"redis://127.0.0.1:{free_port()}/0" if mode == "standalone" else redis_server.url
    store = RedisStore(RedisSettings(url=url, mode=mode, timeout=0.2))
    detector, raised = detector_with(store)
    with pytest.raises(ServiceUnavailableError):
        await detector.observe(request(T0, "ps_alice", "acme"))
    before = REGISTRY.get_sample_value("gateway_anomaly_errors_total") or 0
    detector.start()
    detector.submit(request(T0, "ps_alice", "acme"))
    detector.submit(request(T0 + 1, "ps_alice", "acme"))
    await asyncio.wait_for(detector.drain(), 5)
    assert REGISTRY.get_sample_value("gateway_anomaly_errors_total") == before + 2
    await detector.close()


async def test_replicas_sharing_redis_share_baselines_and_cooldowns(redis_server):
    stores = [RedisStore(RedisSettings(url=redis_server.url, timeout=1.0)) for _ in range(2)]
    raised: list[Anomaly] = []
    replicas = [AnomalyDetector(AnomalySettings(min_history=5), s, raised.append) for s in stores]
    for minute in range(10):  # each replica sees every other request
        for slot in range(4):
            at = T0 + minute * 60 + slot
            await replicas[slot % 2].observe(request(at, "ps_alice", "acme"))
    assert raised == []
    for slot in range(8):  # a spike split across both replicas is one anomaly
        at = T0 + 10 * 60 + slot
        await replicas[slot % 2].observe(request(at, "ps_alice", "acme", tokens=2500))
    assert summary(raised) == [
        ("tokens_per_minute", "principal", "ps_alice", 10),
        ("tokens_per_minute", "tenant", "acme", 10),
    ]
    for replica in replicas:
        await replica.close()


def expected_scores(settings: AnomalySettings, rolled: Rolled) -> list[str]:
    """The detectors a minute should raise, by the plain formula for every metric."""
    found = []
    for metric in METRICS:
        base = rolled.baselines.get(metric, Baseline())
        spread = scale(base, metric, settings.relative_floor)
        if (rolled.current.get(metric, 0.0) - base.mean) / spread >= settings.threshold:
            found.append(f"{metric}_per_minute")
    return found


@pytest.mark.parametrize("threshold", [0.01, 0.5, 6.0])
def test_scoring_skips_only_minutes_that_cannot_reach_the_threshold(threshold):
    settings = AnomalySettings(threshold=threshold)
    detector = AnomalyDetector(settings, MemoryStore(), lambda _: None)
    rng = random.Random(9)
    for _ in range(300):
        baselines = {m: Baseline(rng.uniform(0, 100), rng.uniform(0, 20), 12)
                     for m in METRICS if rng.random() < 0.8}  # fmt: skip
        current = {m: rng.choice([rng.uniform(0, 150), baselines.get(m, Baseline()).mean])
                   for m in METRICS}  # fmt: skip
        rolled = Rolled(current, None, baselines, 12)
        found: list[Anomaly] = []
        detector._score("principal", "ps_alice", (current, baselines), Observation(at=T0), found)
        assert [a.detector for a in found] == expected_scores(settings, rolled)


async def test_the_memory_store_forgets_expired_seen_sets_past_its_bound(monkeypatch):
    monkeypatch.setattr(anomaly_state, "_MAX_SEEN_SETS", 3)
    store = MemoryStore()

    def seeing(*sets: tuple[str, float]) -> Visit:
        return Visit("principal:ps_alice", {"requests": 1.0}, tuple((n, "m", t) for n, t in sets))

    async def visit(one: Visit) -> Visited:
        [reading] = await store.read([Step((one,), 0, 9, T0)])
        return reading.visited[0]

    for name, ttl in (("old-1", -1.0), ("old-2", -1.0), ("kept-1", 60.0), ("kept-2", 60.0)):
        await visit(seeing((name, ttl)))
    again = await visit(seeing(("old-1", 60.0), ("kept-1", 60.0)))
    assert again.new == [True, False]


def random_traffic(rng: random.Random, count: int) -> list[Observation]:
    """Four principals of two tenants (a token spike now and then), refused logins from two
    addresses, errors, injections, canaries, rare models and endpoints, from 09:40 to past
    10:00 (so that unusual-hour checks fire too), about four seconds apart."""
    people = [("ps_a", "acme"), ("ps_b", "acme"), ("ps_c", "globex"), ("ps_d", "globex")]
    at, found = T0 + 40 * 60 + rng.random() * 60, []
    for _ in range(count):
        at += rng.expovariate(1 / 4.0)
        if rng.random() < 0.03:  # a few failed logins a second apart
            for _ in range(rng.randint(1, 4)):
                at += rng.random()
                address, credential = f"203.0.{rng.randint(0, 1)}.0/24", rng.choice(["k1", "k2"])
                found.append(Observation(at=at, address=address, status=401, credential=credential))
            continue
        principal, tenant = rng.choice(people)
        spike = principal == "ps_b" and int(at // 60) % 13 == 0
        found.append(request(
            at, principal, tenant, address=ADDRESS, credential="k9",
            model=rng.choice(["gpt-4o-mini"] * 12 + ["fast", "o1", None]),
            endpoint=rng.choice(["chat.completions"] * 12 + ["responses"]),
            status=rng.choice([200] * 20 + [500, 429, 403, 400]),
            tokens=rng.randint(200, 300) * (10 if spike else 1),
            violations=int(rng.random() < 0.05), injection_blocks=int(rng.random() < 0.04),
            canary_leak=rng.random() < 0.005, redactions=rng.choice([0, 0, 0, 1, 2]),
        ))  # fmt: skip
    return found


def in_batches(items: list[T], rng: random.Random) -> list[list[T]]:
    batches, start = [], 0
    while start < len(items):
        size = rng.randint(1, 48)
        batches.append(items[start : start + size])
        start += size
    return batches


def spans_a_minute(batch: list[Observation]) -> bool:
    """Whether one principal has requests on both sides of a minute boundary in the batch."""
    minutes: dict[str | None, set[int]] = {}
    for obs in batch:
        minutes.setdefault(obs.principal, set()).add(int(obs.at // 60))
    return any(len(seen) > 1 for who, seen in minutes.items() if who)


async def state_under(client: aioredis.Redis, prefix: str) -> dict[str, object]:
    """Every key under `prefix` (without it) and its value; windows as their scores."""
    found: dict[str, object] = {}
    async for raw in client.scan_iter(match=prefix + "*"):
        key, kind = raw.decode().removeprefix(prefix), (await client.type(raw)).decode()
        if kind == "hash":
            found[key] = await client.hgetall(raw)
        elif kind == "set":
            found[key] = await client.smembers(raw)
        elif kind == "zset":
            found[key] = [score for _, score in await client.zrange(raw, 0, -1, withscores=True)]
        else:
            found[key] = await client.get(raw)
        found[key + " expires"] = await client.ttl(raw) > 0
    return found


async def test_batches_raise_exactly_what_one_by_one_analysis_raises(store_url):
    settings = {"min_history": 3, "cooldown": 120, "auth_failures": 3, "auth_window": 30,
                "injection_blocks": 2, "hour_min_days": 0.01}  # fmt: skip
    traffic = random_traffic(random.Random(11), 700)
    batches = in_batches(traffic, random.Random(12))
    assert sum(spans_a_minute(batch) for batch in batches) >= 10
    prefixes = ("t:one:", "t:many:")
    stores = [MemoryStore() if store_url is None else
              RedisStore(RedisSettings(url=store_url, timeout=1.0), prefix=prefix)
              for prefix in prefixes]  # fmt: skip
    one, one_raised = detector_with(stores[0], **settings)
    many, many_raised = detector_with(stores[1], **settings)
    for obs in traffic:
        await one.observe(obs)
    for batch in batches:
        await many.observe_batch(batch)

    assert many_raised == one_raised
    assert {a.detector for a in one_raised} == {
        "auth_failure_burst_address", "auth_failure_burst_credential", "canary_leak",
        "first_endpoint_use", "first_model_use", "prompt_injection_repeated",
        "tokens_per_minute", "unusual_hour",
    }  # fmt: skip
    if store_url is not None:
        client = aioredis.Redis.from_url(store_url)
        assert await state_under(client, prefixes[1]) == await state_under(client, prefixes[0])
        await client.aclose()
    for store in stores:
        await store.close()


async def test_one_read_of_many_steps_finds_what_reading_each_alone_finds(store_url):
    settings = RedisSettings(url=store_url, timeout=1.0)
    stores = [MemoryStore() if store_url is None else RedisStore(settings, prefix=prefix)
              for prefix in ("t:one:", "t:many:")]  # fmt: skip
    detector, _ = detector_with(MemoryStore(), hour_min_days=0.01)
    traffic = random_traffic(random.Random(5), 400)
    steps = [
        s for obs in traffic for s in plan([obs], detector._windows([obs]), first_use=True).steps
    ]
    alone = [reading for step in steps for reading in await stores[0].read([step])]
    together = []
    for batch in in_batches(steps, random.Random(6)):
        together += await stores[1].read(batch)
    assert together == alone
    for store in stores:
        await store.close()


_SCRIPT_CALLS = ("cmdstat_eval", "cmdstat_evalsha")


class RoundTrips:
    """Scripts the private Redis itself has run (INFO commandstats; the commands a script
    calls count apart): each of the store's round trips is one script call, on whichever
    connection it uses."""

    def __init__(self, url: str) -> None:
        self._client = aioredis.Redis.from_url(url)

    async def count(self) -> int:
        stats = await self._client.info("commandstats")
        return sum(int(stats.get(name, {}).get("calls", 0)) for name in _SCRIPT_CALLS)

    async def close(self) -> None:
        await self._client.aclose()


@pytest.fixture
async def round_trips(redis_server) -> AsyncIterator[RoundTrips]:
    trips = RoundTrips(redis_server.url)
    yield trips
    await trips.close()


async def test_a_batch_is_read_in_one_round_trip_and_written_in_one(redis_server, round_trips):
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=1.0))
    detector, raised = detector_with(store, min_history=1, auth_failures=3)
    await detector.observe(request(T0, "ps_alice", "acme"))  # connects
    quiet = [request(T0 + 1 + i, principal, tenant) for i, (principal, tenant) in
             enumerate(TEAM * 10)]  # fmt: skip
    before = await round_trips.count()
    assert await detector.observe_batch(quiet) == []
    assert await round_trips.count() == before + 1, "nothing to write: one read"

    busy = [request(T0 + 60 + i, principal, tenant) for i, (principal, tenant) in
            enumerate(TEAM * 10)]  # fmt: skip
    busy += [Observation(at=T0 + 100 + i, address=ADDRESS, status=401) for i in range(10)]
    busy += [request(T0 + 119, "ps_bob", "acme", canary_leak=True)]
    before = await round_trips.count()
    found = await detector.observe_batch(busy)
    closed = "minutes closed and anomalies: one read, one write"
    assert await round_trips.count() == before + 2, closed
    assert sorted(a.detector for a in found) == ["auth_failure_burst_address", "canary_leak"]
    assert raised == found
    await store.close()


async def test_a_flushed_script_is_loaded_again(redis_server):
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=1.0))
    detector, raised = detector_with(store)
    await detector.observe(request(T0, "ps_alice", "acme"))
    client = aioredis.Redis.from_url(redis_server.url)
    await client.script_flush()
    await detector.observe(request(T0 + 1, "ps_alice", "acme", canary_leak=True))
    assert [a.detector for a in raised] == ["canary_leak"]
    assert await client.hget("{gateway:anomaly}:m:principal:ps_alice", "c:requests") == b"2"
    await client.aclose()
    await store.close()


async def test_a_fast_burst_of_5000_requests_is_analysed_in_full(redis_server, round_trips):
    """Bursts of 32 (as from 32 requests in flight) with one loop turn between them: every
    request is analysed, none dropped at the default queue size, in batches of at least a
    burst. (5000 fit the default queue of 10000 in any case: what this shows is that the
    consumer batches what queued while it waited for Redis.)"""
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=1.0))
    detector, raised = detector_with(store)
    detector.start()
    dropped = REGISTRY.get_sample_value("gateway_anomaly_dropped_total") or 0
    errors = REGISTRY.get_sample_value("gateway_anomaly_errors_total") or 0
    before, total, burst = await round_trips.count(), 5000, 32
    for start in range(0, total, burst):
        for index in range(start, min(start + burst, total)):
            principal, tenant = TEAM[index % len(TEAM)]
            detector.submit(request(T0 + index * 0.01, principal, tenant))
        await asyncio.sleep(0)
    await asyncio.wait_for(detector.drain(), 30)

    assert REGISTRY.get_sample_value("gateway_anomaly_dropped_total") == dropped
    assert REGISTRY.get_sample_value("gateway_anomaly_errors_total") == errors
    assert await round_trips.count() - before <= -(-total // burst), "one read per burst at most"
    client = aioredis.Redis.from_url(redis_server.url)
    counted = [
        await client.hget(f"{{gateway:anomaly}}:m:principal:{p}", "c:requests") for p, _ in TEAM
    ]
    assert sum(float(count) for count in counted) == total
    await client.aclose()
    assert raised == []
    await detector.close()


async def test_each_request_of_a_run_reads_what_it_reads_alone(store_url):
    """A run's requests read as one visit: each one's minute counts, new members and hourly
    counts, recovered from the visit, are what reading it alone finds."""
    settings = RedisSettings(url=store_url, timeout=1.0)
    one, many = (MemoryStore() if store_url is None else RedisStore(settings, prefix=prefix)
                 for prefix in ("t:one:", "t:many:"))  # fmt: skip
    detector, _ = detector_with(MemoryStore())
    traffic = random_traffic(random.Random(21), 400)
    alone = {}
    for position, obs in enumerate(traffic):
        planned = plan([obs], detector._windows([obs]), first_use=True)
        readings = await one.read(planned.steps)
        for run, reading in zip(planned.owners, readings, strict=True):
            if isinstance(run, int):
                continue  # a request's rule windows
            visited = reading.visited[0]
            hours, _ = visited.hours
            added = {key for (key, _, _), new in zip(run.seen, visited.new, strict=True) if new}
            hour = int(obs.at // 3600) % 24
            alone[position, run.kind] = (visited.rolled.current, added, hours[hour], sum(hours))

    together, runs, offset = {}, 0, 0
    for batch in in_batches(traffic, random.Random(22)):
        planned = plan(batch, detector._windows(batch), first_use=True)
        readings = await many.read(planned.steps)
        for run, reading in zip(planned.owners, readings, strict=True):
            if isinstance(run, int):
                continue
            visited = reading.visited[0]
            added = new_members(run, visited)
            counts = minute_counts(run, batch, visited, added)
            hours, _ = visited.hours
            hour = int(batch[run.positions[0]].at // 3600) % 24
            runs += len(run.positions) > 1
            for request, position in enumerate(run.positions):
                together[offset + position, run.kind] = (
                    counts[request], added.get(request, set()),
                    hours[hour] + request, sum(hours) + request,
                )  # fmt: skip
        offset += len(batch)
    assert runs >= 50, "many runs stand for several requests"
    assert together == alone
    await one.close()
    await many.close()
