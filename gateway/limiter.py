"""Rate limits, token quotas and budgets across replicas: the one module that talks to Redis
for limits.

Owns the Redis client (standalone, Sentinel or Cluster; TLS and AUTH from config), running the
scripts of `gateway.limits` by SHA (reloaded on NOSCRIPT), the circuit breaker, the failure
mode (closed: 503; open: limit in this process's memory, logged and counted) with automatic
recovery, limiter metrics, and the translation of Redis errors into `ServiceUnavailableError`.
Must not know HTTP or OpenAI payloads; the algorithms are documented in `gateway.limits`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from gateway import metrics
from gateway.config import LimitSettings, LimitValues, RedisSettings
from gateway.errors import ServiceUnavailableError
from gateway.limits import (
    RESERVE_LUA,
    RESERVE_SHA,
    SETTLE_LUA,
    SETTLE_SHA,
    Ask,
    Backend,
    Decision,
    Limit,
    MemoryBackend,
    Reservation,
    decision_from,
    limits_for,
    script_arguments,
)
from gateway.log import get_logger
from gateway.redis_client import open_redis

log = get_logger("gateway.limiter")


class RedisBackend:
    """The scripts run by SHA on Redis; any Redis failure becomes `ServiceUnavailableError`."""

    name = "redis"

    def __init__(self, settings: RedisSettings, prefix: str) -> None:
        self._client = open_redis(settings)
        self._tag = "{" + prefix + "}:"  # one hash tag: a request's keys share a Cluster slot
        self._deadline = settings.timeout + settings.connect_timeout

    async def reserve(self, ask: Ask, now_ms: float | None) -> Decision:
        """`now_ms` None uses the Redis server's clock, which orders all replicas' calls."""
        keys = [self._tag + lim.key for lim in ask.limits]
        args = [
            _stamp(now_ms),
            ask.request_id,
            ask.tokens,
            ask.least,
            *script_arguments(ask.limits),
        ]
        reply = await self._run(RESERVE_LUA, RESERVE_SHA, keys, args)
        return decision_from(ask, reply, self.name)

    async def settle(self, reservation: Reservation, used: int, now_ms: float | None) -> None:
        keys = [self._tag + lim.key for lim in reservation.limits]
        args = [_stamp(now_ms), reservation.request_id, used - reservation.granted,
                *script_arguments(reservation.limits)]  # fmt: skip
        await self._run(SETTLE_LUA, SETTLE_SHA, keys, args)

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(self, script: str, sha: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._call(self._client.evalsha(sha, len(keys), *keys, *args))
        except NoScriptError:
            pass  # Redis restarted or flushed its script cache: load once, run again
        except RedisError as exc:
            raise _unavailable(exc) from exc
        await self._call(self._client.script_load(script))
        return await self._call(self._client.evalsha(sha, len(keys), *keys, *args))

    async def _call(self, command: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline):
                return await command
        except NoScriptError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from exc


def _stamp(now_ms: float | None) -> str:
    return "" if now_ms is None else f"{now_ms:.3f}"


def _unavailable(exc: BaseException) -> ServiceUnavailableError:
    log.warning("ratelimit_redis_failed", error_type=type(exc).__name__)
    return ServiceUnavailableError(
        "The rate limiter's store is unavailable, so the request was refused. Try again shortly."
    )


class Breaker:
    """Opens after `failures` consecutive failures; after `open_seconds` lets one trial through."""

    def __init__(self, failures: int, open_seconds: float, clock: Callable[[], float]) -> None:
        self._threshold = failures
        self._open_seconds = open_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allows(self) -> bool:
        if self._opened_at is None:
            return True
        now = self._clock()
        if now - self._opened_at < self._open_seconds:
            return False
        if self._trial_at is not None and now - self._trial_at < self._open_seconds:
            return False  # one trial at a time; a trial that never reported is retried later
        self._trial_at = now
        return True

    def succeeded(self) -> None:
        if self._opened_at is not None:
            log.info("ratelimit_breaker_closed")
            metrics.RATELIMIT_BREAKER.labels("closed").inc()
        self._failures, self._opened_at, self._trial_at = 0, None, None

    def failed(self) -> None:
        self._failures += 1
        self._trial_at = None
        if self._failures >= self._threshold:
            if self._opened_at is None:
                log.warning("ratelimit_breaker_opened", failures=self._failures)
                metrics.RATELIMIT_BREAKER.labels("open").inc()
            self._opened_at = self._clock()


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

    def limits_for(self, values: LimitValues, dimension: str, ident: str) -> list[Limit]:
        lease_ms = math.ceil(self.settings.lease_seconds * 1000)
        return limits_for(values, dimension, ident, now=self.clock(), lease_ms=lease_ms)

    async def reserve(self, ask: Ask) -> Decision:
        started = time.perf_counter()
        decision = await self._reserve(ask)
        backend = decision.reservation.backend if decision.reservation else "any"
        metrics.RATELIMIT_SECONDS.labels(backend, "reserve").observe(time.perf_counter() - started)
        _count_decision(decision)
        return decision

    async def _reserve(self, ask: Ask) -> Decision:
        now_ms = round(self.clock() * 1000, 3)
        if self.redis is None:
            return await self.memory.reserve(ask, now_ms)
        if not self.breaker.allows():
            return await self._fallback("breaker_open").reserve(ask, now_ms)
        try:
            decision = await self.redis.reserve(ask, None)
        except ServiceUnavailableError:
            self.breaker.failed()
            return await self._fallback("redis_error").reserve(ask, now_ms)
        self.breaker.succeeded()
        return decision

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Charges `used` tokens instead of the granted ones and frees the concurrency slot."""
        started = time.perf_counter()
        now_ms = round(self.clock() * 1000, 3)
        if reservation.backend == self.memory.name or self.redis is None:
            await self.memory.settle(reservation, used, now_ms)
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
        metrics.RATELIMIT_SECONDS.labels("redis", "settle").observe(time.perf_counter() - started)

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
        _ALLOWED.inc()
        return
    outcome = "quota" if blocked.kind == "b" else "limited"
    metrics.RATELIMIT_DECISIONS.labels(blocked.name, blocked.dimension, outcome).inc()


_ALLOWED = metrics.RATELIMIT_DECISIONS.labels("all", "all", "allowed")
