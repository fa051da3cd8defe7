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
from gateway.anomaly_batch import Folded, Plan, Run, minute_counts, new_members, plan
from gateway.anomaly_redis import RedisStore
from gateway.anomaly_state import (
    METRICS,
    Baseline,
    Claim,
    MemoryStore,
    Observation,
    Reading,
    Rolled,
    Store,
    Visited,
    Window,
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


def _wake(work: asyncio.Future[None] | None) -> None:
    """Ends the consumer's wait, if it is waiting."""
    if work is not None and not work.done():
        work.set_result(None)


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
class _Pass:
    """One analysis of a batch: its requests, the baselines folded so far, and the anomalies
    found per request (position) and identity kind."""

    batch: Sequence[Observation]
    folded: Folded
    found: dict[tuple[int, str], list[Anomaly]] = field(default_factory=dict)


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
        self._hour_after = settings.hour_min_days * 86400  # seconds of history before hour checks
        self._task: asyncio.Task[None] | None = None
        # The queue: a list and two kinds of waiters cost a request less than `asyncio.Queue`
        # (its put, get and task_done are a handful of calls each).
        self._pending: list[Observation] = []  # submitted, not taken by the task yet
        self._queue_size = settings.queue_size
        self._analysing = 0  # taken, not analysed yet
        self._work: asyncio.Future[None] | None = None  # the task, waiting for requests
        self._wake_at = 1  # requests pending that end the task's wait
        self._linger = settings.batch_linger
        self._drained: list[asyncio.Future[None]] = []  # `drain` calls, waiting for it all

    def submit(self, observation: Observation) -> None:
        if len(self._pending) >= self._queue_size:
            metrics.ANOMALY_DROPPED.inc()
            return
        pending = self._pending
        pending.append(observation)
        work = self._work
        if work is not None and len(pending) >= self._wake_at and not work.done():
            work.set_result(None)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def close(self, drain_timeout: float = 2.0) -> None:
        """Analyses what is queued (up to `drain_timeout`), then stops and closes the store."""
        if self._task is not None:
            try:
                async with asyncio.timeout(drain_timeout):
                    await self.drain()
            except TimeoutError:
                log.warning("anomaly_queue_not_drained", pending=len(self._pending))
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.store.close()

    async def drain(self) -> None:
        """Waits until everything submitted so far has been analysed."""
        while self._pending or self._analysing:
            done = asyncio.get_running_loop().create_future()
            self._drained.append(done)
            _wake(self._work)  # a batch waiting to fill is read now
            await done

    async def _consume(self) -> None:
        while True:
            if not self._pending:
                self._wake_drained()
                await self._wait_for(1)
            if self._linger and len(self._pending) < _BATCH and not self._drained:
                await self._wait_for(_BATCH, self._linger)
            batch = self._pending[:_BATCH]
            del self._pending[:_BATCH]
            self._analysing = len(batch)
            try:
                await self.observe_batch(batch)
            except ServiceUnavailableError:
                metrics.ANOMALY_ERRORS.inc(len(batch))
                log.warning("anomaly_detection_failed", reason="state store unavailable",
                            requests=len(batch))  # fmt: skip
            finally:
                self._analysing = 0

    async def _wait_for(self, count: int, linger: float | None = None) -> None:
        """Until `count` requests are pending, `linger` seconds have passed or `drain` is
        called. (Lingering lets one read of the store serve more requests.)"""
        loop = asyncio.get_running_loop()
        work = self._work = loop.create_future()
        self._wake_at = count
        timer = None if linger is None else loop.call_later(linger, _wake, work)
        await work
        if timer is not None:
            timer.cancel()

    def _wake_drained(self) -> None:
        waiting, self._drained = self._drained, []
        for done in waiting:
            if not done.done():
                done.set_result(None)

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
        cooldown claims stay atomic in the store, so replicas still raise an anomaly once.)
        An identity's requests of one minute are read as one visit (`gateway.anomaly_batch`)
        and each one's view is recovered from it."""
        planned = plan(batch, self._windows(batch), first_use=self.settings.first_use)
        readings = await self.store.read(planned.steps)
        work = _Pass(batch, Folded())
        found = self._analyse(work, planned, readings)
        saves = work.folded.saves()
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

    def _windows(self, batch: Sequence[Observation]) -> list[tuple[int, tuple[Window, ...]]]:
        """The requests (positions) that add events to rule windows, with their events."""
        found = []
        for position, obs in enumerate(batch):
            if obs.status != 401 and not obs.injection_blocks:
                continue  # most requests: no rule counts them
            windows = tuple((burst.key, burst.window) for burst in self._bursts(obs))
            if windows:
                found.append((position, windows))
        return found

    def _analyse(self, work: _Pass, planned: Plan, readings: Sequence[Reading]) -> list[Anomaly]:
        """Every detector on every request, in the batch's order (per request: its principal,
        its tenant, its rule windows, a canary leak), from what the plan's steps read."""
        recent: dict[int, list[int]] = {}
        for owner, reading in zip(planned.owners, readings, strict=True):
            if isinstance(owner, int):
                recent[owner] = reading.recent
            else:
                self._analyse_run(work, owner, reading.visited[0])
        found: list[Anomaly] = []
        for position, obs in enumerate(work.batch):
            if work.found:
                for kind in ("principal", "tenant"):
                    found += work.found.get((position, kind), ())
            if position in recent:
                self._burst(obs, recent[position], found)
            if obs.canary_leak:
                kind, ident = (obs.identities() or [("address", obs.address or "unknown")])[0]
                found.append(Anomaly("canary_leak", kind, ident, 1, 0, 0, "critical", obs.at))
        return found

    def _analyse_run(self, work: _Pass, run: Run, visited: Visited) -> None:
        """The identity detectors on each request of a run that any of them can flag. Scoring
        and first use need the identity's history; only then is each request's view
        recovered. (The hour check flags none within `hour_min_days` of the first use.)"""
        batch = work.batch
        rolled = self._roll(run.key, visited.rolled, work.folded)
        established = rolled.history >= self.settings.min_history
        hours, first = visited.hours
        at_hour = total = 0.0
        hour_checked = (run.minute + 1) * 60 - first > self._hour_after
        if hour_checked:  # each request adds one to both, so the hour's share only grows:
            at_hour, total = hours[run.hour], sum(hours)  # none is rare if the first's is not
            hour_checked = total > 0 and at_hour / total < self.settings.hour_min_share
        if not established and not hour_checked:
            return  # no request of this minute can be scored or flagged for its hour
        first_added = new_members(run, visited) if established else {}
        scored = established and not self._quiet(run, batch, rolled)
        counts = minute_counts(run, batch, visited, first_added) if scored else []
        every = scored or hour_checked
        for request in range(len(run.positions)) if every else sorted(first_added):
            obs, hits = batch[run.positions[request]], list[Anomaly]()
            if scored:
                self._score(run.kind, run.ident, (counts[request], rolled.baselines), obs, hits)
            if request in first_added:
                self._first_use(run.kind, run.ident, obs, first_added[request], hits)
            if hour_checked:
                self._hour(run.kind, run.ident, obs, (at_hour + request, total + request,
                           first), hits)  # fmt: skip
            if hits:
                work.found[run.positions[request], run.kind] = hits

    def _quiet(self, run: Run, batch: Sequence[Observation], rolled: Rolled) -> bool:
        """Whether no request of the run scores an anomaly: when none adds a negative count
        (tokens come from upstream), its counts only grow, so none does if the last one, with
        the counts after the run, does not."""
        if any(batch[p].tokens < 0 or batch[p].violations < 0 or batch[p].redactions < 0
               for p in run.positions):  # fmt: skip
            return False
        found: list[Anomaly] = []
        last = batch[run.positions[-1]]
        self._score(run.kind, run.ident, (rolled.current, rolled.baselines), last, found)
        return not found

    def _burst(self, obs: Observation, counts: Sequence[int], found: list[Anomaly]) -> None:
        for burst, count in zip(self._bursts(obs), counts, strict=True):
            if count >= burst.threshold:
                found.append(Anomaly(burst.detector, burst.kind, burst.identity, count,
                                     burst.threshold, 0, "high", obs.at))  # fmt: skip

    def _roll(self, key: str, rolled: Rolled, folded: Folded) -> Rolled:
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
        self, kind: str, ident: str, minute: tuple[dict[str, float], dict[str, Baseline]],
        obs: Observation, found: list[Anomaly],
    ) -> None:  # fmt: skip
        """Scores every metric of the current minute (`minute`: its counts and baselines)
        against its baseline. A value at or below the mean scores 0 or less, under any
        threshold (they are positive): skipped."""
        settings, (current, baselines) = self.settings, minute
        for metric in METRICS:
            value = current.get(metric, 0.0)
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
        self, kind: str, ident: str, obs: Observation, added: set[str], found: list[Anomaly]
    ) -> None:
        """For an established identity; `added`: the seen sets this request added a new
        member to."""
        if not self.settings.first_use or not added:
            return
        for what, value in (("model", obs.model), ("endpoint", obs.endpoint)):
            if value is not None and f"{what}s:{kind}:{ident}" in added:
                found.append(Anomaly(f"first_{what}_use", kind, ident, 1, 0, 0, "low", obs.at))

    def _hour(
        self, kind: str, ident: str, obs: Observation, hours: tuple[float, float, float],
        found: list[Anomaly],
    ) -> None:  # fmt: skip
        """`hours`: the identity's requests in this hour of the day and in all hours before
        this request, and its first use."""
        hour = int(obs.at // 3600) % 24
        at_hour, total, first = hours
        if obs.at - first < self._hour_after:
            return
        if not total:
            return
        share = at_hour / total
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
