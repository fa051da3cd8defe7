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
import functools
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
    BATCH_SIZE,
    SERVER_CLOCK,
    Batch,
    Encoding,
    batch_argument,
    reserve_operation,
    settle_operation,
)
from gateway.limits import (
    Ask,
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


class RedisBackend:
    """Runs the limit script on Redis; any Redis failure becomes `ServiceUnavailableError`.

    Reservations and settlements go to Redis in batches: one EVALSHA whose reply holds each
    caller's own answer. A batch is sent at the end of the event-loop iteration that opened it,
    or, while another batch is on its way, as soon as that one is answered (so a busy process
    makes one round trip per Redis latency, not one per request); a full batch goes at once.
    A failed batch fails every caller in it alike; a cancelled caller does not disturb the
    others. A caller waits at most for the batch ahead of it and its own: two deadlines.

    `queue_settle` queues a settlement whose caller waits for its batch but does not hear of
    a failure: `settled`, given at construction, hears once per batch of the queue times of
    those it held and the batch's error, if any.
    """

    name = "redis"

    def __init__(self, settings: RedisSettings, prefix: str, *,
                 settled: Settled | None = None) -> None:  # fmt: skip
        self._client = open_redis(settings)
        client = self._client
        self._line = RedisLine(client, settings.timeout) if isinstance(client, Redis) else None
        self._tag = "{" + prefix + "}:"  # one hash tag: every key shares a Cluster slot
        self._deadline = settings.timeout + settings.connect_timeout
        self._settled = settled
        self._open: Batch | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._batches = itertools.count()
        self._encodings: dict[int, Encoding] = {}  # id(limits) -> how they are encoded

    async def reserve(self, ask: Ask, now_ms: float | None) -> Decision:
        """`now_ms` None uses the Redis server's clock, which orders all replicas' calls."""
        return decision_from(ask, await self.reply_to(ask, now_ms), self.name)

    def reply_to(self, ask: Ask, now_ms: float | None = None) -> asyncio.Future[Any]:
        """Queues the reservation of `ask`; the future gets the script's reply to it."""
        batch = self._open or self._new_batch()
        words = batch.words_of(self._encoding(ask.limits))
        return batch.add(reserve_operation(ask, _stamp(now_ms), words), self._flush)

    async def settle(self, reservation: Reservation, used: int, now_ms: float | None) -> None:
        batch = self._open or self._new_batch()
        words = batch.words_of(self._encoding(reservation.limits))
        await batch.add(settle_operation(reservation, used, _stamp(now_ms), words), self._flush)

    def queue_settle(
        self, reservation: Reservation, used: int, queued: float
    ) -> asyncio.Future[Any]:
        """Queues a settlement on the server's clock; its future ends when its batch is
        answered, failed or not: how it went is for `settled` (see the class)."""
        batch = self._open or self._new_batch()
        words = batch.words_of(self._encoding(reservation.limits))
        operation = settle_operation(reservation, used, SERVER_CLOCK, words)
        waiter = batch.add_settlement(operation, queued)
        if len(batch.waiters) >= BATCH_SIZE:
            self._flush(batch)
        return waiter

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

    def _new_batch(self) -> Batch:
        """A batch to gather into, sent once this event-loop iteration ends."""
        loop = asyncio.get_running_loop()
        batch = self._open = Batch(loop, next(self._batches))
        loop.call_soon(self._flush, batch)
        return batch

    def _encoding(self, limits: tuple[Limit, ...]) -> Encoding:
        """How `limits` go into batches: the very tuple seen before is found by its id, without
        hashing each Limit (the encoding keeps the tuple alive, so its id is not reused)."""
        encoding = self._encodings.get(id(limits))
        if encoding is None or encoding.limits is not limits:
            if len(self._encodings) >= _ENCODINGS_KEPT:
                self._encodings.clear()  # many callers, or budgets' limits made per request
            encoding = self._encodings[id(limits)] = Encoding(self._tag, limits)
        return encoding

    def _flush(self, batch: Batch) -> None:
        """Sends `batch`, unless it was sent already or one is on its way and it is not full."""
        if batch is not self._open or (self._sending and len(batch.waiters) < BATCH_SIZE):
            return
        self._open = None
        task = batch.loop.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(batch.finish)
        if batch.queued and self._settled is not None:
            task.add_done_callback(functools.partial(_report, self._settled, batch.queued))

    async def _send(self, batch: Batch) -> None:
        try:
            sent = batch.to_send()
            if sent:
                operations = batch.operations
                if len(sent) < len(operations):
                    operations = [operations[i] for i in sent]
                batch.resolve(sent, await self._run(list(batch.slots), operations))
        finally:
            self._sending.discard(asyncio.current_task())
            if self._open is not None:
                self._flush(self._open)  # the batch gathered meanwhile

    async def _run(self, keys: list[str], operations: list[str]) -> Any:
        argument = batch_argument(operations)
        try:
            return await self._evalsha(keys, argument)
        except NoScriptError:
            pass  # Redis restarted or flushed its script cache: load once, run again
        await self._call(self._client.script_load(BATCH_LUA))
        return await self._evalsha(keys, argument)

    async def _evalsha(self, keys: list[str], argument: str) -> Any:
        """The batch script's reply; on the batch connection (which keeps the deadline itself)
        unless this is Cluster or a second batch is on its way at once."""
        line = self._line
        if line is None or line.busy:
            return await self._call(self._client.evalsha(BATCH_SHA, len(keys), *keys, argument))
        try:
            return await line.run(_evalsha_command(keys, argument), self._deadline)
        except NoScriptError:
            raise
        except _REDIS_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def _call(self, command: Awaitable[Any]) -> Any:
        """`command`'s reply within the deadline; Redis failures (not NOSCRIPT, which the
        caller handles) as `ServiceUnavailableError`."""
        try:
            async with asyncio.timeout(self._deadline):
                return await command
        except NoScriptError:
            raise
        except _REDIS_ERRORS as exc:
            raise _unavailable(exc) from exc


Settled = Callable[[list[float], BaseException | None], None]
_REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


def _report(settled: Settled, queued: list[float], task: asyncio.Task[None]) -> None:
    """Tells `settled` how the batch of these unawaited settlements went (not if cancelled:
    the process is closing)."""
    if not task.cancelled():
        settled(queued, task.exception())


def _evalsha_command(keys: list[str], argument: str) -> bytes:
    """EVALSHA of the batch script in Redis's wire form."""
    return packed(["EVALSHA", BATCH_SHA, str(len(keys)), *keys, argument])


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
        self.redis = (
            RedisBackend(redis, settings.key_prefix, settled=self._settled) if use_redis else None
        )
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
        redis = self.redis
        if redis is None:
            decision = self.memory.reserve_now(ask, self._now_ms())
        elif not self.breaker.allows():
            decision = self._fallback("breaker_open").reserve_now(ask, self._now_ms())
        else:
            try:
                reply = await redis.reply_to(ask)
            except ServiceUnavailableError:
                self.breaker.failed()
                decision = self._fallback("redis_error").reserve_now(ask, self._now_ms())
            else:
                self.breaker.succeeded()
                decision = decision_from(ask, reply, redis.name)
        self._observe(decision, time.perf_counter() - started)
        return decision

    def settle(self, reservation: Reservation, used: int) -> asyncio.Future[Any] | None:
        """Charges `used` tokens instead of the granted ones and frees the concurrency slot.

        On Redis the settlement joins the next batch: the future it returns ends when that
        batch is answered (a whole answer is sent only then, so no replica sees the request
        still holding what it settled), failed or not; `_settled` counts a failure for the
        breaker. Returning the future, not awaiting it here, spares a coroutine per request."""
        redis = self.redis
        if redis is None or reservation.backend == self.memory.name:
            self.memory.settle_now(reservation, used, self._now_ms())
            return None
        if not self.breaker.allows():
            log.warning("ratelimit_settle_skipped", reason="breaker_open")
            return None
        return redis.queue_settle(reservation, used, time.perf_counter())

    def _settled(self, queued: list[float], error: BaseException | None) -> None:
        """How a batch's queued settlements went: each queued at a `perf_counter` time."""
        if error is None:
            self.breaker.succeeded()
            now = time.perf_counter()
            for started in queued:
                _SETTLE_SECONDS(now - started)
            return
        if not isinstance(error, ServiceUnavailableError):
            log.error("ratelimit_settle_failed", exc_info=error)
            return
        for _ in queued:
            self.breaker.failed()  # leases expire; tokens of these requests stay as reserved

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

    def _observe(self, decision: Decision, elapsed: float) -> None:
        backend = decision.reservation.backend if decision.reservation else "any"
        observe = self._reserve_seconds.get(backend)
        if observe is None:
            observe = metrics.observer(metrics.RATELIMIT_SECONDS, backend, "reserve")
            self._reserve_seconds[backend] = observe
        observe(elapsed)
        _count_decision(decision)

    def _fallback(self, reason: str) -> MemoryBackend:
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
_ENCODINGS_KEPT = 4096  # limits tuples whose encodings are kept
