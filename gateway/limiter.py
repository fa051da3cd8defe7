"""Rate limits, token quotas and budgets across replicas: the one module that talks to Redis
for limits.

Owns the Redis client (standalone, Sentinel or Cluster; TLS and AUTH from config), batching
the operations of concurrent requests into runs of the `gateway.limit_script` script by SHA
(reloaded on NOSCRIPT; on a `gateway.redis_line` connection of its own), the circuit breaker,
the failure mode (closed: 503; open: limit in this process's memory, logged and counted) with
automatic recovery, limiter metrics, and the translation of Redis errors into
`ServiceUnavailableError`. Must not know HTTP or OpenAI payloads; the algorithms are
documented in `gateway.limits`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway import metrics
from gateway.config import LimitSettings, LimitValues, RedisSettings
from gateway.errors import ServiceUnavailableError
from gateway.limit_breaker import Breaker
from gateway.limit_script import (
    BATCH_LUA,
    BATCH_SHA,
    SERVER_CLOCK,
    batch_argument,
    is_reservation,
    limit_words,
    reserve_operation,
    settle_operation,
)
from gateway.limits import (
    Ask,
    Backend,
    Decision,
    Limit,
    MemoryBackend,
    Reservation,
    decision_from,
    limits_for,
)
from gateway.log import get_logger
from gateway.redis_client import open_redis
from gateway.redis_line import RedisLine, packed

log = get_logger("gateway.limiter")

BATCH_SIZE = 128  # operations per script call; a fuller batch is sent at once


class RedisBackend:
    """Runs the limit script on Redis; any Redis failure becomes `ServiceUnavailableError`.

    Reservations and settlements go to Redis in batches: one EVALSHA whose reply holds each
    caller's own answer. A batch is sent at the end of the event-loop iteration that opened it,
    or, while another batch is on its way, as soon as that one is answered (so a busy process
    makes one round trip per Redis latency, not one per request); a full batch goes at once.
    A failed batch fails every caller in it alike; a cancelled caller does not disturb the
    others. A caller waits at most for the batch ahead of it and its own: two deadlines.
    """

    name = "redis"

    def __init__(self, settings: RedisSettings, prefix: str) -> None:
        self._client = open_redis(settings)
        client = self._client
        self._line = RedisLine(client, settings.timeout) if isinstance(client, Redis) else None
        self._tag = "{" + prefix + "}:"  # one hash tag: every key shares a Cluster slot
        self._deadline = settings.timeout + settings.connect_timeout
        self._open: _Batch | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def reserve(self, ask: Ask, now_ms: float | None) -> Decision:
        """`now_ms` None uses the Redis server's clock, which orders all replicas' calls."""
        batch = self._batch()
        words = batch.words_of(self._tag, ask.limits)
        reply = await batch.add(reserve_operation(ask, _stamp(now_ms), words), self._flush)
        return decision_from(ask, reply, self.name)

    async def settle(self, reservation: Reservation, used: int, now_ms: float | None) -> None:
        batch = self._batch()
        words = batch.words_of(self._tag, reservation.limits)
        await batch.add(settle_operation(reservation, used, _stamp(now_ms), words), self._flush)

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        if self._open is not None:
            self._flush(self._open)
        while self._sending:  # each ends within its deadline, then sends the batch behind it
            await asyncio.wait(set(self._sending))
        if self._line is not None:
            await self._line.close()
        await self._client.aclose()

    def _batch(self) -> _Batch:
        """The batch being gathered; a new one is sent once this event-loop iteration ends."""
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
            asyncio.get_running_loop().call_soon(self._flush, batch)
        return batch

    def _flush(self, batch: _Batch) -> None:
        """Sends `batch`, unless it was sent already or one is on its way and it is not full."""
        if batch is not self._open or (self._sending and len(batch.waiters) < BATCH_SIZE):
            return
        self._open = None
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(batch.finish)

    async def _send(self, batch: _Batch) -> None:
        try:
            sent = batch.to_send()
            if sent:
                operations = [batch.operations[i] for i in sent]
                batch.resolve(sent, await self._run(list(batch.slots), operations))
        finally:
            self._sending.discard(asyncio.current_task())
            if self._open is not None:
                self._flush(self._open)  # the batch gathered meanwhile

    async def _run(self, keys: list[str], operations: list[str]) -> Any:
        try:
            return await self._call(self._evalsha(keys, operations))
        except NoScriptError:
            pass  # Redis restarted or flushed its script cache: load once, run again
        await self._call(self._client.script_load(BATCH_LUA))
        return await self._call(self._evalsha(keys, operations))

    async def _evalsha(self, keys: list[str], operations: list[str]) -> Any:
        line, argument = self._line, batch_argument(operations)
        if line is None or line.busy:  # Cluster, or a second batch on its way at once
            return await self._call(self._client.evalsha(BATCH_SHA, len(keys), *keys, argument))
        return await _translated(line.run(_evalsha_command(keys, argument), self._deadline))

    async def _call(self, command: Awaitable[Any]) -> Any:
        return await _translated(_within(self._deadline, command))


def _evalsha_command(keys: list[str], argument: str) -> bytes:
    """EVALSHA of the batch script in Redis's wire form."""
    return packed(["EVALSHA", BATCH_SHA, str(len(keys)), *keys, argument])


async def _translated(command: Awaitable[Any]) -> Any:
    """Redis failures (not NOSCRIPT, which the caller handles) as `ServiceUnavailableError`."""
    try:
        return await command
    except NoScriptError:
        raise
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        raise _unavailable(exc) from exc


async def _within(seconds: float, command: Awaitable[Any]) -> Any:
    async with asyncio.timeout(seconds):
        return await command


class _Batch:
    """Operations gathered for one script call, and the futures their callers await."""

    __slots__ = ("slots", "words", "seen", "operations", "waiters")

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}  # key -> its index in KEYS (from 1): each key sent once
        self.words: dict[tuple[Limit, ...], str] = {}  # limits -> their words in this batch
        # id(limits) -> (limits, words): the very tuple seen before is found without hashing
        # each Limit; keeping it alive keeps its id from being reused within the batch.
        self.seen: dict[int, tuple[tuple[Limit, ...], str]] = {}
        self.operations: list[str] = []
        self.waiters: list[asyncio.Future[Any]] = []

    def words_of(self, tag: str, limits: tuple[Limit, ...]) -> str:
        """The operation words of `limits` in this batch, encoded once per batch: concurrent
        requests of one caller (or one tier) share their limits, so most are found."""
        seen = self.seen.get(id(limits))
        if seen is not None and seen[0] is limits:
            return seen[1]
        words = self.words.get(limits)
        if words is None:
            slots = self.slots
            indexes = [slots.setdefault(tag + lim.key, len(slots) + 1) for lim in limits]
            words = self.words[limits] = limit_words(limits, indexes)
        self.seen[id(limits)] = (limits, words)
        return words

    def add(self, operation: str, flush: Callable[[_Batch], None]) -> asyncio.Future[Any]:
        """Queues `operation`; the future gets its reply. A full batch is sent at once."""
        waiter = asyncio.get_running_loop().create_future()
        self.operations.append(operation)
        self.waiters.append(waiter)
        if len(self.waiters) >= BATCH_SIZE:
            flush(self)
        return waiter

    def to_send(self) -> list[int]:
        """Indexes of the operations to send: all but reservations whose caller is gone (the
        client went away); a settlement goes even then, to free what its request held."""
        operations, waiters = self.operations, self.waiters
        return [i for i, waiter in enumerate(waiters)
                if not waiter.cancelled() or not is_reservation(operations[i])]  # fmt: skip

    def resolve(self, sent: list[int], replies: Sequence[Any]) -> None:
        for i, reply in zip(sent, replies, strict=True):
            waiter = self.waiters[i]
            if not waiter.done():  # done: its caller was cancelled meanwhile
                waiter.set_result(reply)

    def finish(self, task: asyncio.Task[None]) -> None:
        """Hands a failed (or cancelled) send to every caller still waiting."""
        cancelled = task.cancelled()
        error = None if cancelled else task.exception()
        if not cancelled and error is None:
            return
        for waiter in self.waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.cancel()
            else:
                waiter.set_exception(_own_copy(error))


def _own_copy(error: BaseException) -> BaseException:
    """Each caller raises its own error, so no traceback is shared between tasks."""
    if not isinstance(error, ServiceUnavailableError):
        return error
    copy = ServiceUnavailableError(error.message)
    copy.__cause__ = error.__cause__
    return copy


def _stamp(now_ms: float | None) -> str:
    return SERVER_CLOCK if now_ms is None else f"{now_ms:.3f}"


def _unavailable(exc: BaseException) -> ServiceUnavailableError:
    log.warning("ratelimit_redis_failed", error_type=type(exc).__name__)
    return ServiceUnavailableError(
        "The rate limiter's store is unavailable, so the request was refused. Try again shortly."
    )


class Limiter:
    """Reserves and settles limits on Redis (shared) or in memory, per `LimitSettings`.

    `reserve` raises `ServiceUnavailableError` only when Redis is unavailable and the failure
    mode is closed; with failure mode open it limits in this process's memory instead.
    """

    def __init__(self, settings: LimitSettings, redis: RedisSettings, *,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.settings = settings
        self.clock = clock
        self.memory = MemoryBackend()
        use_redis = settings.backend == "redis" or (settings.backend == "auto" and redis.url)
        self.redis = RedisBackend(redis, settings.key_prefix) if use_redis else None
        breaker = settings.breaker
        self.breaker = Breaker(breaker.failures, breaker.open_seconds, time.monotonic)
        self._lease_ms = math.ceil(settings.lease_seconds * 1000)
        self._fixed: dict[tuple[str, str], tuple[LimitValues, tuple[Limit, ...]]] = {}
        self._reserve_seconds: dict[str, metrics.Observe] = {}  # backend -> its observer
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count()

    def limits_for(self, values: LimitValues, dimension: str, ident: str) -> Sequence[Limit]:
        """The limits of one dimension; those that do not change with time are built once."""
        if values.daily_tokens is not None or values.monthly_tokens is not None:
            return limits_for(values, dimension, ident, now=self.clock(), lease_ms=self._lease_ms)
        cached = self._fixed.get((dimension, ident))
        if cached is not None and cached[0] is values:
            return cached[1]
        if len(self._fixed) >= _FIXED_LIMITS_KEPT:
            self._fixed.clear()  # many idle subjects: start over rather than grow
        found = tuple(limits_for(values, dimension, ident, now=0.0, lease_ms=self._lease_ms))
        self._fixed[(dimension, ident)] = (values, found)
        return found

    def request_id(self) -> str:
        """A new id for an `Ask`: unique across processes (a random prefix each) and restarts."""
        return f"{self._id_prefix}{next(self._ids):x}"

    async def reserve(self, ask: Ask) -> Decision:
        started = time.perf_counter()
        decision = await self._reserve(ask)
        backend = decision.reservation.backend if decision.reservation else "any"
        elapsed = time.perf_counter() - started
        observe = self._reserve_seconds.get(backend)
        if observe is None:
            observe = metrics.observer(metrics.RATELIMIT_SECONDS, backend, "reserve")
            self._reserve_seconds[backend] = observe
        observe(elapsed)
        _count_decision(decision)
        return decision

    async def _reserve(self, ask: Ask) -> Decision:
        if self.redis is None:
            return await self.memory.reserve(ask, self._now_ms())
        if not self.breaker.allows():
            return await self._fallback("breaker_open").reserve(ask, self._now_ms())
        try:
            decision = await self.redis.reserve(ask, None)
        except ServiceUnavailableError:
            self.breaker.failed()
            return await self._fallback("redis_error").reserve(ask, self._now_ms())
        self.breaker.succeeded()
        return decision

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Charges `used` tokens instead of the granted ones and frees the concurrency slot."""
        started = time.perf_counter()
        if reservation.backend == self.memory.name or self.redis is None:
            await self.memory.settle(reservation, used, self._now_ms())
            return
        if not self.breaker.allows():
            log.warning("ratelimit_settle_skipped", reason="breaker_open")
            return
        try:
            await self.redis.settle(reservation, used, None)
        except ServiceUnavailableError:
            self.breaker.failed()  # leases expire; tokens of this request stay as reserved
            return
        self.breaker.succeeded()
        _SETTLE_SECONDS(time.perf_counter() - started)

    async def check_ready(self) -> str | None:
        """For /readyz: a reason when Redis is down and the limiter fails closed."""
        if self.redis is None or self.settings.failure_mode == "open":
            return None
        try:
            await self.redis.ping()
        except ServiceUnavailableError:
            return "rate limiter: redis unavailable"
        return None

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

    def _now_ms(self) -> float:
        return round(self.clock() * 1000, 3)

    def _fallback(self, reason: str) -> Backend:
        """The memory backend when failing open; otherwise refuses with 503."""
        action = "memory" if self.settings.failure_mode == "open" else "refused"
        metrics.RATELIMIT_FALLBACK.labels(reason, action).inc()
        if action == "refused":
            raise ServiceUnavailableError(
                "The rate limiter's store is unavailable, so the request was refused. "
                "Try again shortly."
            )
        log.warning("ratelimit_fail_open", reason=reason)
        return self.memory


def _count_decision(decision: Decision) -> None:
    """One count per request: allowed (limit `all`), or the one limit that refused it."""
    blocked = decision.blocked
    if blocked is None:
        _ALLOWED(1)
        return
    outcome = "quota" if blocked.kind == "b" else "limited"
    metrics.RATELIMIT_DECISIONS.labels(blocked.name, blocked.dimension, outcome).inc()


_ALLOWED = metrics.incrementer(metrics.RATELIMIT_DECISIONS, "all", "all", "allowed")
_SETTLE_SECONDS = metrics.observer(metrics.RATELIMIT_SECONDS, "redis", "settle")
_FIXED_LIMITS_KEPT = 65_536  # (dimension, ident) pairs whose limits are kept built
