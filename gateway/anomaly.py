"""Online anomaly detection over finished requests, per principal and per tenant.

Owns the robust baselines (per-minute EWMA with an exponentially weighted absolute deviation,
a minimum history and a cooldown), the rule detectors (auth-failure bursts by address and by
key, repeated prompt-injection blocks, canary leaks, first use of a model or endpoint, unusual
hour) and their state: in memory, or in Redis (shared by replicas) when `redis.url` is set.
Must never run on the request path: requests are queued and analysed by a background task.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.config import AnomalySettings, Settings
from gateway.errors import ServiceUnavailableError
from gateway.log import get_logger

METRICS = ("requests", "tokens", "errors", "violations", "redactions", "models")
# Smallest spread per metric, so a perfectly steady baseline does not turn +1 into infinity.
_MIN_SPREAD = {"requests": 2.0, "tokens": 50.0, "errors": 1.0, "violations": 1.0,
               "redactions": 2.0, "models": 1.0}  # fmt: skip
_DETECTOR = {m: f"{m}_per_minute" for m in METRICS}
_STATE_TTL = 14 * 86400
log = get_logger("gateway.anomaly")


@dataclass(frozen=True, slots=True)
class Observation:
    """What detection needs from one finished request: pseudonyms and counts, no content."""

    at: float
    principal: str | None = None
    tenant: str | None = None
    address: str | None = None  # truncated network
    credential: str | None = None  # key id or fingerprint of the presented credential
    model: str | None = None
    endpoint: str | None = None
    status: int = 200
    tokens: int = 0
    violations: int = 0
    injection_blocks: int = 0
    canary_leak: bool = False
    redactions: int = 0

    def identities(self) -> list[tuple[str, str]]:
        found = [("principal", self.principal), ("tenant", self.tenant)]
        return [(kind, ident) for kind, ident in found if ident]


@dataclass(frozen=True, slots=True)
class Anomaly:
    detector: str
    kind: str  # principal, tenant, address or credential
    identity: str
    observed: float
    baseline: float
    score: float
    severity: str
    at: float


@dataclass(slots=True)
class Baseline:
    mean: float = 0.0
    spread: float = 0.0  # EWMA of absolute deviations
    count: int = 0


@dataclass(slots=True)
class Rolled:
    """The identity's minute after adding one request, and the minute it closed if any."""

    current: dict[str, float]
    closed: dict[str, float] | None
    baselines: dict[str, Baseline]
    history: int


def scale(baseline: Baseline, metric: str, relative_floor: float) -> float:
    """The robust spread: the deviation, a share of the mean or the metric's floor (the largest)."""
    floor = max(relative_floor * baseline.mean, _MIN_SPREAD[metric])
    return max(1.25 * baseline.spread, floor)


def fold(baseline: Baseline, value: float, settings: AnomalySettings, metric: str) -> Baseline:
    """Adds one closed minute; outliers are clipped so an attack does not become the norm."""
    if baseline.count == 0:
        return Baseline(value, 0.0, 1)
    limit = baseline.mean + settings.threshold * scale(baseline, metric, settings.relative_floor)
    value = min(value, limit)
    alpha = settings.alpha
    spread = (1 - alpha) * baseline.spread + alpha * abs(value - baseline.mean)
    return Baseline((1 - alpha) * baseline.mean + alpha * value, spread, baseline.count + 1)


class Store(Protocol):
    """Detector state; every method may raise `ServiceUnavailableError`."""

    async def roll(self, key: str, minute: int, counts: Mapping[str, float]) -> Rolled: ...

    async def save(self, key: str, baselines: Mapping[str, Baseline], history: int) -> None: ...

    async def add_seen(self, key: str, member: str, ttl: float) -> bool: ...

    async def count_recent(self, key: str, now: float, window: float) -> int: ...

    async def claim(self, key: str, now: float, cooldown: float) -> bool: ...

    async def add_hour(self, key: str, hour: int, now: float) -> tuple[list[float], float]: ...

    async def close(self) -> None: ...


@dataclass
class _Minute:
    minute: int = -1
    counts: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    history: int = 0


class MemoryStore:
    """Per-process state (each replica learns alone)."""

    def __init__(self) -> None:
        self._minutes: dict[str, _Minute] = {}
        self._seen: dict[str, tuple[set[str], float]] = {}
        self._events: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}
        self._hours: dict[str, tuple[list[float], float]] = {}

    async def roll(self, key: str, minute: int, counts: Mapping[str, float]) -> Rolled:
        state = self._minutes.setdefault(key, _Minute())
        closed = None
        if state.minute < minute:
            closed = dict(state.counts) if state.minute >= 0 else None
            state.minute, state.counts = minute, {}
        for name, value in counts.items():
            state.counts[name] = state.counts.get(name, 0.0) + value
        baselines = {m: Baseline(b.mean, b.spread, b.count) for m, b in state.baselines.items()}
        return Rolled(dict(state.counts), closed, baselines, state.history)

    async def save(self, key: str, baselines: Mapping[str, Baseline], history: int) -> None:
        state = self._minutes.setdefault(key, _Minute())
        state.baselines, state.history = dict(baselines), history

    async def add_seen(self, key: str, member: str, ttl: float) -> bool:
        members, _ = self._seen.get(key, (set(), 0.0))
        new = member not in members
        members.add(member)
        self._seen[key] = (members, time.monotonic() + ttl)
        if len(self._seen) > 100_000:
            now = time.monotonic()
            self._seen = {k: v for k, v in self._seen.items() if v[1] > now}
        return new

    async def count_recent(self, key: str, now: float, window: float) -> int:
        events = self._events.setdefault(key, deque())
        events.append(now)
        while events and events[0] <= now - window:
            events.popleft()
        return len(events)

    async def claim(self, key: str, now: float, cooldown: float) -> bool:
        if self._until.get(key, float("-inf")) > now:
            return False
        self._until[key] = now + cooldown
        return True

    async def add_hour(self, key: str, hour: int, now: float) -> tuple[list[float], float]:
        hours, first = self._hours.get(key, ([0.0] * 24, now))
        before = list(hours)
        hours[hour] += 1
        self._hours[key] = (hours, first)
        return before, first

    async def close(self) -> None:
        """Nothing to release."""


_ROLL = """
local current = tonumber(redis.call('HGET', KEYS[1], 'minute') or '-1')
local minute = tonumber(ARGV[1])
local closed = false
if current < minute then
  if current >= 0 then
    closed = {}
    for i = 3, #ARGV, 2 do
      closed[ARGV[i]] = tonumber(redis.call('HGET', KEYS[1], 'c:' .. ARGV[i]) or '0')
    end
  end
  for i = 3, #ARGV, 2 do redis.call('HDEL', KEYS[1], 'c:' .. ARGV[i]) end
  redis.call('HSET', KEYS[1], 'minute', minute)
end
for i = 3, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], 'c:' .. ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return cjson.encode({closed = closed, state = redis.call('HGETALL', KEYS[1])})
"""
_CLAIM = """
local ends = tonumber(redis.call('GET', KEYS[1]) or '-1')
if ends > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1] + ARGV[2], 'EX', math.ceil(ARGV[2]) + 60)
return 1
"""


class RedisStore:
    """State shared by every replica; Redis errors become `ServiceUnavailableError` here."""

    def __init__(self, url: str, timeout: float, prefix: str = "gateway:anomaly:") -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._prefix = prefix
        self._ids = itertools.count()

    async def _call(self, *args: Any) -> Any:
        try:
            return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            raise ServiceUnavailableError("Anomaly state in Redis is unavailable.") from exc

    async def roll(self, key: str, minute: int, counts: Mapping[str, float]) -> Rolled:
        pairs = [str(part) for item in counts.items() for part in item]
        raw = await self._call("EVAL", _ROLL, 1, self._prefix + "m:" + key, minute, _STATE_TTL,
                               *pairs)  # fmt: skip
        reply = orjson.loads(raw)
        flat = [str(part) for part in reply["state"]]
        state = dict(zip(flat[::2], flat[1::2], strict=True))
        current = {k[2:]: float(v) for k, v in state.items() if k.startswith("c:")}
        baselines = {
            m: Baseline(float(state[f"e:{m}"]), float(state[f"d:{m}"]), int(state[f"n:{m}"]))
            for m in METRICS if f"e:{m}" in state
        }  # fmt: skip
        closed = reply["closed"] or None
        return Rolled(current, closed, baselines, int(state.get("history", 0)))

    async def save(self, key: str, baselines: Mapping[str, Baseline], history: int) -> None:
        values: list[str] = ["history", str(history)]
        for metric, base in baselines.items():
            values += [f"e:{metric}", repr(base.mean), f"d:{metric}", repr(base.spread),
                       f"n:{metric}", str(base.count)]  # fmt: skip
        await self._call("HSET", self._prefix + "m:" + key, *values)

    async def add_seen(self, key: str, member: str, ttl: float) -> bool:
        name = self._prefix + "s:" + key
        added = await self._call("SADD", name, member)
        await self._call("EXPIRE", name, int(ttl) + 1)
        return bool(added)

    async def count_recent(self, key: str, now: float, window: float) -> int:
        name = self._prefix + "w:" + key
        member = f"{now!r}:{next(self._ids)}:{id(self)}"
        await self._call("ZADD", name, now, member)
        await self._call("ZREMRANGEBYSCORE", name, "-inf", now - window)
        await self._call("EXPIRE", name, int(window) + 60)
        return int(await self._call("ZCARD", name))

    async def claim(self, key: str, now: float, cooldown: float) -> bool:
        return bool(await self._call("EVAL", _CLAIM, 1, self._prefix + "c:" + key, now, cooldown))

    async def add_hour(self, key: str, hour: int, now: float) -> tuple[list[float], float]:
        name = self._prefix + "h:" + key
        await self._call("HSETNX", name, "first", repr(now))
        raw = await self._call("HGETALL", name)
        await self._call("HINCRBY", name, str(hour), 1)
        await self._call("EXPIRE", name, _STATE_TTL)
        values = {_text(k): _text(v) for k, v in dict(raw).items()}
        return [float(values.get(str(h), 0)) for h in range(24)], float(values["first"])

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_store(settings: Settings) -> Store:
    """Redis when configured (shared by replicas), memory otherwise."""
    url = settings.redis.url
    if url is None:
        return MemoryStore()
    return RedisStore(url.get_secret_value(), settings.redis.timeout)


Emit = Callable[[Anomaly], None]


class AnomalyDetector:
    """Scores finished requests in a background task fed by a bounded queue.

    `submit` never waits; `observe` is the analysis itself (tests call it with a fake clock).
    """

    def __init__(
        self,
        settings: AnomalySettings,
        store: Store,
        emit: Emit,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.store, self._emit, self.clock = settings, store, emit, clock
        self._queue: asyncio.Queue[Observation] = asyncio.Queue(settings.queue_size)
        self._task: asyncio.Task[None] | None = None

    def submit(self, observation: Observation) -> None:
        try:
            self._queue.put_nowait(observation)
        except asyncio.QueueFull:
            metrics.ANOMALY_DROPPED.inc()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def close(self, drain_timeout: float = 2.0) -> None:
        """Analyses what is queued (up to `drain_timeout`), then stops and closes the store."""
        if self._task is not None:
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._queue.join()
            except TimeoutError:
                log.warning("anomaly_queue_not_drained", pending=self._queue.qsize())
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.store.close()

    async def drain(self) -> None:
        """Waits until everything submitted so far has been analysed."""
        await self._queue.join()

    async def _consume(self) -> None:
        while True:
            observation = await self._queue.get()
            try:
                await self.observe(observation)
            except ServiceUnavailableError:
                metrics.ANOMALY_ERRORS.inc()
                log.warning("anomaly_detection_failed", reason="state store unavailable")
            finally:
                self._queue.task_done()

    async def observe(self, obs: Observation) -> list[Anomaly]:
        """Runs every detector on one request and emits what passes its cooldown."""
        found: list[Anomaly] = []
        for kind, ident in obs.identities():
            history = await self._baselines(kind, ident, obs, found)
            await self._first_use(kind, ident, obs, history, found)
            await self._hour(kind, ident, obs, found)
        await self._rules(obs, found)
        raised = []
        for anomaly in found:
            key = f"{anomaly.detector}:{anomaly.kind}:{anomaly.identity}"
            if await self.store.claim(key, obs.at, self.settings.cooldown):
                raised.append(anomaly)
                metrics.ANOMALIES.labels(anomaly.detector, anomaly.severity).inc()
                self._emit(anomaly)
        return raised

    async def _baselines(
        self, kind: str, ident: str, obs: Observation, found: list[Anomaly]
    ) -> int:
        minute = int(obs.at // 60)
        new_model = obs.model is not None and await self.store.add_seen(
            f"mm:{kind}:{ident}:{minute}", obs.model, 120
        )
        counts = {"requests": 1.0, "tokens": float(obs.tokens),
                  "errors": float(obs.status >= 500 or obs.status in (401, 403, 429)),
                  "violations": float(obs.violations), "redactions": float(obs.redactions),
                  "models": float(new_model)}  # fmt: skip
        rolled = await self.store.roll(f"{kind}:{ident}", minute, counts)
        baselines, history = rolled.baselines, rolled.history
        if rolled.closed is not None:
            for metric in METRICS:
                base = baselines.get(metric, Baseline())
                value = rolled.closed.get(metric, 0.0)
                baselines[metric] = fold(base, value, self.settings, metric)
            history += 1
            await self.store.save(f"{kind}:{ident}", baselines, history)
        if history >= self.settings.min_history:
            for metric in METRICS:
                self._score(kind, ident, metric, rolled.current.get(metric, 0.0), baselines, obs,
                            found)  # fmt: skip
        return history

    def _score(
        self, kind: str, ident: str, metric: str, value: float,
        baselines: Mapping[str, Baseline], obs: Observation, found: list[Anomaly],
    ) -> None:  # fmt: skip
        base = baselines.get(metric, Baseline())
        score = (value - base.mean) / scale(base, metric, self.settings.relative_floor)
        if score < self.settings.threshold:
            return
        severity = "high" if score >= self.settings.high_score else "medium"
        found.append(Anomaly(_DETECTOR[metric], kind, ident, value, round(base.mean, 3),
                             round(score, 2), severity, obs.at))  # fmt: skip

    async def _first_use(
        self, kind: str, ident: str, obs: Observation, history: int, found: list[Anomaly]
    ) -> None:
        if not self.settings.first_use:
            return
        for what, value in (("model", obs.model), ("endpoint", obs.endpoint)):
            if value is None:
                continue
            new = await self.store.add_seen(f"{what}s:{kind}:{ident}", value, _STATE_TTL)
            if new and history >= self.settings.min_history:
                found.append(Anomaly(f"first_{what}_use", kind, ident, 1, 0, 0, "low", obs.at))

    async def _hour(self, kind: str, ident: str, obs: Observation, found: list[Anomaly]) -> None:
        hour = int(obs.at // 3600) % 24
        hours, first = await self.store.add_hour(f"{kind}:{ident}", hour, obs.at)
        total = sum(hours)
        if obs.at - first < self.settings.hour_min_days * 86400 or not total:
            return
        share = hours[hour] / total
        if share < self.settings.hour_min_share:
            found.append(Anomaly("unusual_hour", kind, ident, hour, round(share, 4), 0, "medium",
                                 obs.at))  # fmt: skip

    async def _rules(self, obs: Observation, found: list[Anomaly]) -> None:
        s = self.settings
        if obs.status == 401:
            for kind, ident in (("address", obs.address), ("credential", obs.credential)):
                if ident:
                    await self._burst(f"auth_failure_burst_{kind}", kind, ident, obs,
                                      (s.auth_failures, s.auth_window), found)  # fmt: skip
        if obs.injection_blocks and obs.principal:
            await self._burst("prompt_injection_repeated", "principal", obs.principal, obs,
                              (s.injection_blocks, s.injection_window), found)  # fmt: skip
        if obs.canary_leak:
            kind, ident = (obs.identities() or [("address", obs.address or "unknown")])[0]
            found.append(Anomaly("canary_leak", kind, ident, 1, 0, 0, "critical", obs.at))

    async def _burst(
        self, detector: str, kind: str, ident: str, obs: Observation,
        limit: tuple[int, float], found: list[Anomaly],
    ) -> None:  # fmt: skip
        threshold, window = limit
        count = await self.store.count_recent(f"{detector}:{ident}", obs.at, window)
        if count >= threshold:
            found.append(Anomaly(detector, kind, ident, count, threshold, 0, "high", obs.at))
