"""Anomaly detection: robust baselines, rule detectors, cooldowns, the queue, shared Redis state."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY

from gateway import anomaly
from gateway.anomaly import (
    METRICS,
    Anomaly,
    AnomalyDetector,
    Baseline,
    MemoryStore,
    Observation,
    RedisStore,
    Rolled,
    Visit,
    fold,
    scale,
)
from gateway.config import AnomalySettings, RedisSettings
from gateway.errors import ServiceUnavailableError
from tests.conftest import free_port

T0 = 1714554000.0  # 2024-05-01 09:00:00 UTC
TEAM = [("ps_alice", "acme"), ("ps_bob", "acme"), ("ps_carol", "acme"), ("ps_dave", "globex")]
ADDRESS = "198.51.100.0/24"


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


async def test_redis_errors_are_translated_and_the_consumer_keeps_going():
    store = RedisStore(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.2))
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
        detector._score("principal", "ps_alice", rolled, Observation(at=T0), found)
        assert [a.detector for a in found] == expected_scores(settings, rolled)


async def test_the_memory_store_forgets_expired_seen_sets_past_its_bound(monkeypatch):
    monkeypatch.setattr(anomaly, "_MAX_SEEN_SETS", 3)
    store = MemoryStore()

    def seeing(*sets: tuple[str, float]) -> Visit:
        return Visit("principal:ps_alice", {"requests": 1.0}, tuple((n, "m", t) for n, t in sets))

    for name, ttl in (("old-1", -1.0), ("old-2", -1.0), ("kept-1", 60.0), ("kept-2", 60.0)):
        await store.visit([seeing((name, ttl))], 0, 9, T0)
    [again] = await store.visit([seeing(("old-1", 60.0), ("kept-1", 60.0))], 0, 9, T0)
    assert again.new == [True, False]
