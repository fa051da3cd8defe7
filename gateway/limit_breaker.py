"""The rate limiter's circuit breaker: after enough consecutive Redis failures, stop asking
Redis for a while, then let one trial through.

Owns `Breaker` and its log events and metric. Must not know Redis or limits.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway import metrics
from gateway.log import get_logger

log = get_logger("gateway.limiter")


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
