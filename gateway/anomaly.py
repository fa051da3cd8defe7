"""Online anomaly detection over finished requests, per principal and per tenant.

Owns the robust baselines (per-minute EWMA with an exponentially weighted absolute deviation,
a minimum history and a cooldown), the rule detectors (auth-failure bursts by address and by
key, repeated prompt-injection blocks, canary leaks, first use of a model or endpoint, unusual
hour) and their state: in memory, or in Redis (shared by replicas) when `redis.url` is set.
Must never run on the request path: requests are queued and analysed by a background task.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from redis.exceptions import NoScriptError, RedisError

from gateway import metrics
from gateway.config import AnomalySettings, RedisSettings, Settings
from gateway.errors import ServiceUnavailableError
from gateway.log import get_logger
from gateway.redis_client import open_redis

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


Seen = tuple[str, str, float]
"""(set key, member, ttl seconds): a member to add to a set of things seen."""


@dataclass(frozen=True, slots=True)
class Visit:
    """What one request adds to one identity's state (`key` is `kind:ident`): its counts to
    the current minute, members to sets of things seen, and one to the hour of day. When
    `new_model` names one of the `seen` keys, the minute's `models` count is 1 if that member
    was new, else 0."""

    key: str
    counts: Mapping[str, float]
    seen: tuple[Seen, ...] = ()
    new_model: str | None = None


@dataclass(slots=True)
class Visited:
    """The identity's state after a `Visit`: its minute rolled, whether each seen member was
    new, and the 24 hourly counts before this request with the time the identity was first
    seen."""

    rolled: Rolled
    new: list[bool]
    hours: tuple[list[float], float]


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
    """Detector state; every method may raise `ServiceUnavailableError`. Methods take every
    identity of a request at once, so that Redis answers a request in few round trips."""

    async def visit(self, visits: Sequence[Visit], minute: int, hour: int,
                    now: float) -> list[Visited]: ...  # fmt: skip

    async def save(self, key: str, baselines: Mapping[str, Baseline], history: int) -> None: ...

    async def count_recent(self, key: str, now: float, window: float) -> int: ...

    async def claim(self, key: str, now: float, cooldown: float) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class _Minute:
    minute: int = -1
    counts: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    history: int = 0


@dataclass(slots=True)
class _Members:
    """A set of things seen and when it expires (`time.monotonic`)."""

    members: set[str] = field(default_factory=set)
    until: float = 0.0


_MAX_SEEN_SETS = 100_000


class MemoryStore:
    """Per-process state (each replica learns alone)."""

    def __init__(self) -> None:
        self._minutes: dict[str, _Minute] = {}
        self._seen: dict[str, _Members] = {}
        self._events: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}
        self._hours: dict[str, tuple[list[float], float]] = {}

    async def visit(self, visits: Sequence[Visit], minute: int, hour: int,
                    now: float) -> list[Visited]:  # fmt: skip
        return [self._visit(visit, minute, hour, now) for visit in visits]

    def _visit(self, visit: Visit, minute: int, hour: int, now: float) -> Visited:
        clock = time.monotonic()
        new = [self._add_seen(key, member, clock + ttl) for key, member, ttl in visit.seen]
        counts = dict(visit.counts)
        if visit.new_model is not None:
            found = [n for (key, _, _), n in zip(visit.seen, new, strict=True)
                     if key == visit.new_model]  # fmt: skip
            counts["models"] = float(any(found))
        rolled = self._roll(visit.key, minute, counts)
        return Visited(rolled, new, self._add_hour(visit.key, hour, now))

    def _roll(self, key: str, minute: int, counts: Mapping[str, float]) -> Rolled:
        state = self._minutes.setdefault(key, _Minute())
        closed = None
        if state.minute < minute:
            closed = dict(state.counts) if state.minute >= 0 else None
            state.minute, state.counts = minute, {}
        for name, value in counts.items():
            state.counts[name] = state.counts.get(name, 0.0) + value
        # A copy of the mapping only: a `Baseline` is replaced (see `fold`), never changed.
        return Rolled(dict(state.counts), closed, dict(state.baselines), state.history)

    async def save(self, key: str, baselines: Mapping[str, Baseline], history: int) -> None:
        state = self._minutes.setdefault(key, _Minute())
        state.baselines, state.history = dict(baselines), history

    def _add_seen(self, key: str, member: str, until: float) -> bool:
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = _Members(until=until)
            if len(self._seen) > _MAX_SEEN_SETS:
                now = time.monotonic()
                self._seen = {k: v for k, v in self._seen.items() if v.until > now}
        new = member not in seen.members
        seen.members.add(member)
        seen.until = until
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

    def _add_hour(self, key: str, hour: int, now: float) -> tuple[list[float], float]:
        known = self._hours.get(key)
        if known is None:
            known = self._hours[key] = ([0.0] * 24, now)
        hours, first = known
        before = list(hours)
        hours[hour] += 1
        return before, first

    async def close(self) -> None:
        """Nothing to release."""


# KEYS: the identity's minute hash, its hours hash, then one set per seen member.
# ARGV: minute, state ttl, hour, now, index of the seen set that counts new models (0: none),
# then member and ttl per seen set, then metric and value pairs. Adds the seen members; rolls
# the minute (a new minute returns the closed one's counts and starts afresh); counts the
# hour. Returns {closed, state, new, hours} as JSON.
_VISIT = """
local minute, ttl, now = tonumber(ARGV[1]), ARGV[2], ARGV[4]
local models_from, sets = tonumber(ARGV[5]), #KEYS - 2
local new = {}
for i = 1, sets do
  new[i] = redis.call('SADD', KEYS[2 + i], ARGV[4 + 2 * i])
  redis.call('EXPIRE', KEYS[2 + i], ARGV[5 + 2 * i])
end
local names, values = {}, {}
for i = 6 + 2 * sets, #ARGV, 2 do
  names[#names + 1], values[#values + 1] = ARGV[i], ARGV[i + 1]
end
if models_from > 0 then
  names[#names + 1], values[#values + 1] = 'models', new[models_from]
end
local current = tonumber(redis.call('HGET', KEYS[1], 'minute') or '-1')
local closed = false
if current < minute then
  if current >= 0 then
    closed = {}
    for i = 1, #names do
      closed[names[i]] = tonumber(redis.call('HGET', KEYS[1], 'c:' .. names[i]) or '0')
    end
  end
  for i = 1, #names do redis.call('HDEL', KEYS[1], 'c:' .. names[i]) end
  redis.call('HSET', KEYS[1], 'minute', minute)
end
for i = 1, #names do redis.call('HINCRBYFLOAT', KEYS[1], 'c:' .. names[i], values[i]) end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('HSETNX', KEYS[2], 'first', now)
local hours = redis.call('HGETALL', KEYS[2])
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('EXPIRE', KEYS[2], ttl)
return cjson.encode({closed = closed, state = redis.call('HGETALL', KEYS[1]), new = new,
                     hours = hours})
"""
_VISIT_SHA = hashlib.sha1(_VISIT.encode(), usedforsecurity=False).hexdigest()
_CLAIM = """
local ends = tonumber(redis.call('GET', KEYS[1]) or '-1')
if ends > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1] + ARGV[2], 'EX', math.ceil(ARGV[2]) + 60)
return 1
"""


class RedisStore:
    """State shared by every replica; Redis errors become `ServiceUnavailableError` here.

    Each method sends its commands in one pipeline: one round trip per call."""

    def __init__(self, settings: RedisSettings, prefix: str = "gateway:anomaly:") -> None:
        self._redis = open_redis(settings)
        self._prefix = prefix
        self._ids = itertools.count()

    async def _call(self, *args: Any) -> Any:
        return (await self._batch([args]))[0]

    async def _batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Runs `commands` in one round trip (not atomically); replies in order."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return list(await pipe.execute())
        except NoScriptError:
            raise
        except (RedisError, OSError) as exc:
            raise ServiceUnavailableError("Anomaly state in Redis is unavailable.") from exc

    async def visit(self, visits: Sequence[Visit], minute: int, hour: int,
                    now: float) -> list[Visited]:  # fmt: skip
        if not visits:
            return []
        commands = [self._visit_command(visit, minute, hour, now) for visit in visits]
        try:
            replies = await self._batch(commands)
        except NoScriptError:  # Redis restarted or flushed its scripts: load once, run again
            await self._call("SCRIPT", "LOAD", _VISIT)
            replies = await self._batch(commands)
        return [_visited(orjson.loads(raw), len(visit.seen))
                for raw, visit in zip(replies, visits, strict=True)]  # fmt: skip

    def _visit_command(self, visit: Visit, minute: int, hour: int, now: float) -> list[Any]:
        keys = [self._prefix + "m:" + visit.key, self._prefix + "h:" + visit.key]
        keys += [self._prefix + "s:" + key for key, _, _ in visit.seen]
        models_from = next((i + 1 for i, (key, _, _) in enumerate(visit.seen)
                            if key == visit.new_model), 0)  # fmt: skip
        args: list[Any] = [minute, _STATE_TTL, hour, repr(now), models_from]
        for _, member, ttl in visit.seen:
            args += [member, int(ttl) + 1]
        args += [str(part) for item in visit.counts.items() for part in item]
        return ["EVALSHA", _VISIT_SHA, len(keys), *keys, *args]

    async def save(self, key: str, baselines: Mapping[str, Baseline], history: int) -> None:
        values: list[str] = ["history", str(history)]
        for metric, base in baselines.items():
            values += [f"e:{metric}", repr(base.mean), f"d:{metric}", repr(base.spread),
                       f"n:{metric}", str(base.count)]  # fmt: skip
        await self._call("HSET", self._prefix + "m:" + key, *values)

    async def count_recent(self, key: str, now: float, window: float) -> int:
        name = self._prefix + "w:" + key
        member = f"{now!r}:{next(self._ids)}:{id(self)}"
        commands = [("ZADD", name, now, member), ("ZREMRANGEBYSCORE", name, "-inf", now - window),
                    ("EXPIRE", name, int(window) + 60), ("ZCARD", name)]  # fmt: skip
        return int((await self._batch(commands))[3])

    async def claim(self, key: str, now: float, cooldown: float) -> bool:
        return bool(await self._call("EVAL", _CLAIM, 1, self._prefix + "c:" + key, now, cooldown))

    async def close(self) -> None:
        await self._redis.aclose()


def _rolled(reply: dict[str, Any]) -> Rolled:
    flat = [str(part) for part in reply["state"]]
    state = dict(zip(flat[::2], flat[1::2], strict=True))
    current = {k[2:]: float(v) for k, v in state.items() if k.startswith("c:")}
    baselines = {
        m: Baseline(float(state[f"e:{m}"]), float(state[f"d:{m}"]), int(state[f"n:{m}"]))
        for m in METRICS if f"e:{m}" in state
    }  # fmt: skip
    closed = reply["closed"] or None
    return Rolled(current, closed, baselines, int(state.get("history", 0)))


def _visited(reply: dict[str, Any], sets: int) -> Visited:
    new = reply["new"] if isinstance(reply["new"], list) else []  # cjson: {} when empty
    flat = [str(part) for part in reply["hours"]]
    values = dict(zip(flat[::2], flat[1::2], strict=True))
    hours = [float(values.get(str(h), 0)) for h in range(24)], float(values["first"])
    return Visited(_rolled(reply), [bool(n) for n in new] + [False] * (sets - len(new)), hours)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_store(settings: Settings) -> Store:
    """Redis when configured (shared by replicas), memory otherwise."""
    if settings.redis.url is None:
        return MemoryStore()
    return RedisStore(settings.redis)


Emit = Callable[[Anomaly], None]


def _counts(obs: Observation) -> dict[str, float]:
    """What one request adds to its identity's current minute (but `models`: see `Visit`)."""
    return {"requests": 1.0, "tokens": float(obs.tokens),
            "errors": float(obs.status >= 500 or obs.status in (401, 403, 429)),
            "violations": float(obs.violations), "redactions": float(obs.redactions)}  # fmt: skip


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
        identities = obs.identities()
        minute, hour = int(obs.at // 60), int(obs.at // 3600) % 24
        visits = [self._visit(kind, ident, obs, minute) for kind, ident in identities]
        visited = await self.store.visit(visits, minute, hour, obs.at)
        found: list[Anomaly] = []
        for (kind, ident), visit, state in zip(identities, visits, visited, strict=True):
            history = await self._baselines(kind, ident, state.rolled, obs, found)
            new = {key: added for (key, _, _), added in zip(visit.seen, state.new, strict=True)}
            self._first_use(kind, ident, obs, (history, new), found)
            self._hour(kind, ident, obs, state.hours, found)
        await self._rules(obs, found)
        raised = []
        for anomaly in found:
            key = f"{anomaly.detector}:{anomaly.kind}:{anomaly.identity}"
            if await self.store.claim(key, obs.at, self.settings.cooldown):
                raised.append(anomaly)
                metrics.ANOMALIES.labels(anomaly.detector, anomaly.severity).inc()
                self._emit(anomaly)
        return raised

    def _visit(self, kind: str, ident: str, obs: Observation, minute: int) -> Visit:
        """What the request adds to the identity: its counts, the models it used this minute
        (the `models` count) and, for first-use detection, the models and endpoints ever."""
        counts = _counts(obs)
        seen: list[Seen] = []
        new_model = None
        if obs.model is not None:
            new_model = f"mm:{kind}:{ident}:{minute}"
            seen.append((new_model, obs.model, 120))
        else:
            counts["models"] = 0.0
        if self.settings.first_use:
            for what, value in (("model", obs.model), ("endpoint", obs.endpoint)):
                if value is not None:
                    seen.append((f"{what}s:{kind}:{ident}", value, _STATE_TTL))
        return Visit(f"{kind}:{ident}", counts, tuple(seen), new_model)

    async def _baselines(
        self, kind: str, ident: str, rolled: Rolled, obs: Observation, found: list[Anomaly]
    ) -> int:
        baselines, history = rolled.baselines, rolled.history
        if rolled.closed is not None:
            for metric in METRICS:
                base = baselines.get(metric, Baseline())
                value = rolled.closed.get(metric, 0.0)
                baselines[metric] = fold(base, value, self.settings, metric)
            history += 1
            await self.store.save(f"{kind}:{ident}", baselines, history)
        if history >= self.settings.min_history:
            self._score(kind, ident, rolled, obs, found)
        return history

    def _score(
        self, kind: str, ident: str, rolled: Rolled, obs: Observation, found: list[Anomaly]
    ) -> None:
        """Scores every metric of the current minute against its baseline. A value at or below
        the mean scores 0 or less, under any threshold (they are positive): skipped."""
        settings, baselines = self.settings, rolled.baselines
        for metric in METRICS:
            value = rolled.current.get(metric, 0.0)
            base = baselines.get(metric)
            if base is None:
                base = Baseline()
            if value <= base.mean:
                continue
            score = (value - base.mean) / scale(base, metric, settings.relative_floor)
            if score < settings.threshold:
                continue
            severity = "high" if score >= settings.high_score else "medium"
            found.append(Anomaly(_DETECTOR[metric], kind, ident, value, round(base.mean, 3),
                                 round(score, 2), severity, obs.at))  # fmt: skip

    def _first_use(
        self, kind: str, ident: str, obs: Observation, state: tuple[int, dict[str, bool]],
        found: list[Anomaly],
    ) -> None:  # fmt: skip
        """`state`: the identity's history (minutes) and which seen-set members were new."""
        history, new = state
        if not self.settings.first_use or history < self.settings.min_history:
            return
        for what, value in (("model", obs.model), ("endpoint", obs.endpoint)):
            if value is not None and new.get(f"{what}s:{kind}:{ident}"):
                found.append(Anomaly(f"first_{what}_use", kind, ident, 1, 0, 0, "low", obs.at))

    def _hour(
        self, kind: str, ident: str, obs: Observation, hours: tuple[list[float], float],
        found: list[Anomaly],
    ) -> None:  # fmt: skip
        """`hours`: the identity's 24 hourly counts before this request, and its first use."""
        hour = int(obs.at // 3600) % 24
        counts, first = hours
        if obs.at - first < self.settings.hour_min_days * 86400:
            return
        total = sum(counts)
        if not total:
            return
        share = counts[hour] / total
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
