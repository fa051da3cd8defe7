"""Online anomaly detection over finished requests, per principal and per tenant.

Owns the robust baselines (per-minute EWMA with an exponentially weighted absolute deviation,
a minimum history and a cooldown), the rule detectors (auth-failure bursts by address and by
key, repeated prompt-injection blocks, canary leaks, first use of a model or endpoint, unusual
hour) and the background task that analyses queued requests in batches. Their state lives in
memory (`gateway.anomaly_state`), or in Redis (`gateway.anomaly_redis`, shared by replicas)
when `redis.url` is set. Must never run on the request path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway import metrics
from gateway.anomaly_redis import RedisStore
from gateway.anomaly_state import (
    METRICS,
    STATE_TTL,
    Baseline,
    Claim,
    MemoryStore,
    Reading,
    Rolled,
    Save,
    Seen,
    Step,
    Store,
    Visit,
)
from gateway.config import AnomalySettings, Settings
from gateway.errors import ServiceUnavailableError
from gateway.log import get_logger

# Smallest spread per metric, so a perfectly steady baseline does not turn +1 into infinity.
_MIN_SPREAD = {"requests": 2.0, "tokens": 50.0, "errors": 1.0, "violations": 1.0,
               "redactions": 2.0, "models": 1.0}  # fmt: skip
_DETECTOR = {m: f"{m}_per_minute" for m in METRICS}
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


def open_store(settings: Settings) -> Store:
    """Redis when configured (shared by replicas), memory otherwise."""
    if settings.redis.url is None:
        return MemoryStore()
    return RedisStore(settings.redis)


Emit = Callable[[Anomaly], None]
# Most requests analysed together (one read of the store, at most one write). Larger batches
# save little client CPU but hold Redis longer: one script run of 64 takes about 2 ms.
_BATCH = 64


@dataclass(frozen=True, slots=True)
class _Burst:
    """A rule counting one identity's events in a sliding window: a burst at `threshold`."""

    detector: str
    kind: str
    identity: str
    threshold: int
    window: float

    @property
    def key(self) -> str:
        return f"{self.detector}:{self.identity}"


@dataclass(slots=True)
class _Folded:
    """The baselines a batch folded and has not written yet, per identity key: its later
    requests take them from here, where one by one they would read them back from the store."""

    latest: dict[str, Rolled] = field(default_factory=dict)

    def carry(self, key: str, rolled: Rolled) -> Rolled:
        kept = self.latest.get(key)
        if kept is None:
            return rolled
        return Rolled(rolled.current, rolled.closed, kept.baselines, kept.history)

    def keep(self, key: str, rolled: Rolled) -> None:
        self.latest[key] = rolled

    def saves(self) -> list[Save]:
        return [Save(key, rolled.baselines, rolled.history) for key, rolled in self.latest.items()]


def _counts(obs: Observation) -> dict[str, float]:
    """What one request adds to its identity's current minute (but `models`: see `Visit`)."""
    return {"requests": 1.0, "tokens": float(obs.tokens),
            "errors": float(obs.status >= 500 or obs.status in (401, 403, 429)),
            "violations": float(obs.violations), "redactions": float(obs.redactions)}  # fmt: skip


class AnomalyDetector:
    """Scores finished requests in a background task fed by a bounded queue.

    `submit` never waits; the task takes what is queued (up to `_BATCH`) and analyses it
    with `observe_batch`; `observe` analyses one request (tests call both with a fake clock).
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
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self.observe_batch(batch)
            except ServiceUnavailableError:
                metrics.ANOMALY_ERRORS.inc(len(batch))
                log.warning("anomaly_detection_failed", reason="state store unavailable",
                            requests=len(batch))  # fmt: skip
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def observe(self, obs: Observation) -> list[Anomaly]:
        """Runs every detector on one request and emits what passes its cooldown."""
        return await self.observe_batch([obs])

    async def observe_batch(self, batch: Sequence[Observation]) -> list[Anomaly]:
        """Runs every detector on each request in order and emits what passes its cooldown:
        the anomalies `observe` would raise on each in turn, with one read of the store and
        at most one write. Minute boundaries inside the batch need no split: the store rolls
        each identity's minutes in order, and the baselines folded at a boundary are carried
        to the batch's later requests here until `write` stores them. (Another replica reads
        the older baselines until then, as it did between a fold and its save one by one;
        cooldown claims stay atomic in the store, so replicas still raise an anomaly once.)"""
        steps = [self._step(obs) for obs in batch]
        readings = await self.store.read(steps)
        folded = _Folded()
        found = [anomaly for obs, step, reading in zip(batch, steps, readings, strict=True)
                 for anomaly in self._analyse(obs, step, reading, folded)]  # fmt: skip
        saves = folded.saves()
        if not saves and not found:
            return []
        claims = [Claim(f"{a.detector}:{a.kind}:{a.identity}", a.at, self.settings.cooldown)
                  for a in found]  # fmt: skip
        won = await self.store.write(saves, claims)
        raised = [anomaly for anomaly, first in zip(found, won, strict=True) if first]
        for anomaly in raised:
            metrics.ANOMALIES.labels(anomaly.detector, anomaly.severity).inc()
            self._emit(anomaly)
        return raised

    def _step(self, obs: Observation) -> Step:
        minute, hour = int(obs.at // 60), int(obs.at // 3600) % 24
        visits = tuple(self._visit(kind, ident, obs, minute) for kind, ident in obs.identities())
        windows = tuple((burst.key, burst.window) for burst in self._bursts(obs))
        return Step(visits, minute, hour, obs.at, windows)

    def _analyse(
        self, obs: Observation, step: Step, reading: Reading, folded: _Folded
    ) -> list[Anomaly]:
        """Every detector on one request, given what its `Step` read."""
        found: list[Anomaly] = []
        for (kind, ident), visit, state in zip(obs.identities(), step.visits, reading.visited,
                                               strict=True):  # fmt: skip
            rolled = self._roll(visit.key, state.rolled, folded)
            if rolled.history >= self.settings.min_history:
                self._score(kind, ident, rolled, obs, found)
            new = {key: added for (key, _, _), added in zip(visit.seen, state.new, strict=True)}
            self._first_use(kind, ident, obs, (rolled.history, new), found)
            self._hour(kind, ident, obs, state.hours, found)
        for burst, count in zip(self._bursts(obs), reading.recent, strict=True):
            if count >= burst.threshold:
                found.append(Anomaly(burst.detector, burst.kind, burst.identity, count,
                                     burst.threshold, 0, "high", obs.at))  # fmt: skip
        if obs.canary_leak:
            kind, ident = (obs.identities() or [("address", obs.address or "unknown")])[0]
            found.append(Anomaly("canary_leak", kind, ident, 1, 0, 0, "critical", obs.at))
        return found

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
                    seen.append((f"{what}s:{kind}:{ident}", value, STATE_TTL))
        return Visit(f"{kind}:{ident}", counts, tuple(seen), new_model)

    def _roll(self, key: str, rolled: Rolled, folded: _Folded) -> Rolled:
        """The identity's minute with its baselines as of now: the last ones folded in this
        batch if any, then the minute that just closed, if one did."""
        rolled = folded.carry(key, rolled)
        if rolled.closed is None:
            return rolled
        closed = rolled.closed
        baselines = {m: fold(rolled.baselines.get(m, Baseline()), closed.get(m, 0.0),
                             self.settings, m) for m in METRICS}  # fmt: skip
        rolled = Rolled(rolled.current, closed, baselines, rolled.history + 1)
        folded.keep(key, rolled)
        return rolled

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

    def _bursts(self, obs: Observation) -> list[_Burst]:
        """The rule windows the request adds an event to."""
        s, found = self.settings, []
        if obs.status == 401:
            for kind, ident in (("address", obs.address), ("credential", obs.credential)):
                if ident:
                    found.append(_Burst(f"auth_failure_burst_{kind}", kind, ident,
                                        s.auth_failures, s.auth_window))  # fmt: skip
        if obs.injection_blocks and obs.principal:
            found.append(_Burst("prompt_injection_repeated", "principal", obs.principal,
                                s.injection_blocks, s.injection_window))  # fmt: skip
        return found
