"""Prometheus collectors of the gateway; nothing else lives at module level.

Owns metric names, help texts and label sets. Labels take bounded values only (route names,
configured model names, status codes, stage names): never ids, keys, users or free text.
"""

from __future__ import annotations

import asyncio
import functools
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.values import MutexValue

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)

REQUESTS = Counter(
    "gateway_requests_total",
    "Requests answered, by route, configured model and HTTP status.",
    ["route", "model", "status"],
)
IN_FLIGHT = Gauge(
    "gateway_requests_in_flight",
    "Requests being handled now (streams count until they end).",
    multiprocess_mode="livesum",
)
UPSTREAM_SECONDS = Histogram(
    "gateway_upstream_seconds",
    "Time from sending to the provider until its response headers arrived.",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
OVERHEAD_SECONDS = Histogram(
    "gateway_overhead_seconds",
    "Time the gateway itself spent on a request: total minus the time waiting on the provider.",
    ["route"],
    buckets=_FAST_BUCKETS,
)
FIRST_CHUNK_SECONDS = Histogram(
    "gateway_time_to_first_chunk_seconds",
    "Time from receiving a streaming request until its first event was written to the client.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total",
    "Failed provider calls by provider and kind (connect, timeout, status, stream).",
    ["provider", "kind"],
)
UPSTREAM_RETRIES = Counter(
    "gateway_upstream_retries_total",
    "Provider calls retried or moved to a fallback provider.",
    ["provider", "reason"],
)
STAGE_SECONDS = Histogram(
    "gateway_stage_seconds",
    "Time spent in each pipeline stage hook.",
    ["stage", "hook"],
    buckets=_FAST_BUCKETS,
)
AUDIT_EVENTS = Counter(
    "gateway_audit_events_total",
    "Audit events written, by dataset (gateway.audit for requests, gateway.security).",
    ["dataset"],
)
AUDIT_WRITE_ERRORS = Counter(
    "gateway_audit_write_errors_total",
    "Audit events a sink failed to write, by sink (stdout, file).",
    ["sink"],
)
ANOMALIES = Counter(
    "gateway_anomalies_total",
    "Anomalies raised, by detector and severity.",
    ["detector", "severity"],
)
ANOMALY_DROPPED = Counter(
    "gateway_anomaly_dropped_total",
    "Requests not analysed for anomalies because the detector's queue was full.",
)
ANOMALY_ERRORS = Counter(
    "gateway_anomaly_errors_total",
    "Requests whose anomaly analysis failed (e.g. Redis unavailable).",
)
RATELIMIT_DECISIONS = Counter(
    "gateway_ratelimit_decisions_total",
    "Rate-limit decisions: a refusal by limit name, dimension kind (key, tenant, model, "
    "global) and decision (limited, quota); an allowed request once, as limit and dimension all.",
    ["limit", "dimension", "decision"],
)
RATELIMIT_SECONDS = Histogram(
    "gateway_ratelimit_seconds",
    "Time to reserve or settle a request's limits, by backend (redis, memory) and operation.",
    ["backend", "operation"],
    buckets=_FAST_BUCKETS,
)
RATELIMIT_FALLBACK = Counter(
    "gateway_ratelimit_fallback_total",
    "Reservations Redis could not serve, by reason (redis_error, breaker_open) and action "
    "(memory: limited in this process; refused: answered 503).",
    ["reason", "action"],
)
RATELIMIT_BREAKER = Counter(
    "gateway_ratelimit_breaker_transitions_total",
    "Times the limiter's Redis circuit breaker opened or closed.",
    ["state"],
)
REDACTION_CACHE = Counter(
    "gateway_redaction_cache_total",
    "Texts the redactor looked up in its analysis cache, by result (hit, miss).",
    ["result"],
)
REDACTION_REJECTED = Counter(
    "gateway_redaction_rejected_total",
    "Analyses refused with 503, by reason (overload, timeout, failed).",
    ["reason"],
)
REDACTION_ENTITIES = Counter(
    "gateway_redaction_entities_total",
    "Values redacted from prompts, by entity type and action.",
    ["entity", "action"],
)
POLICY_DECISIONS = Counter(
    "gateway_policy_decisions_total",
    "Policy rule matches, by direction, action, severity and mode (shadow: not enforced).",
    ["direction", "action", "severity", "mode"],
)
POLICY_RELOADS = Counter(
    "gateway_policy_reloads_total",
    "Policy directory reloads, by outcome (applied, failed: the last good set stays).",
    ["outcome"],
)
POLICY_RELOAD_FAILURES = Counter(
    "gateway_policy_reload_failures_total",
    "Policy changes refused because the new set did not validate.",
)
POLICY_SCAN_SECONDS = Histogram(
    "gateway_policy_scan_seconds",
    "Time to scan one text against the policy set, by direction.",
    ["direction"],
    buckets=_FAST_BUCKETS,
)
POLICY_STREAM_DELAY_SECONDS = Histogram(
    "gateway_policy_first_token_delay_seconds",
    "Time to first token the completion filter added: first text in until first text out.",
    ["route"],
    buckets=_FAST_BUCKETS,
)


Observe = Callable[[float], None]
_OBSERVERS: dict[tuple[Any, ...], Observe] = {}
_INCREMENTERS: dict[tuple[Any, ...], Observe] = {}


def observer(metric: Histogram, *labels: str) -> Observe:
    """`observe` of `metric`'s child with these label values, for the request path; made once.

    prometheus_client's `Histogram.observe` checks the child is observable, walks the buckets
    in Python and takes two locks: about 0.9 µs, with a dozen observations on every request.
    This adds to the same sum and bucket values with a bisection (0.2 µs): what Prometheus
    reads is unchanged (tests/unit/test_metrics.py holds the two equal).

    Call it from the event loop's thread only: in one process the values are changed without
    their lock (see `_in_process`). Under `--workers` they are the shared files: the amounts are
    gathered and go through the values' own `inc` once per event-loop iteration (`_defer`).
    """
    key = (metric, *labels)
    found = _OBSERVERS.get(key)
    if found is None:
        child = metric.labels(*labels) if labels else metric
        found = _OBSERVERS[key] = _observe(child._sum, child._buckets, child._upper_bounds)
    return found


def incrementer(metric: Counter | Gauge, *labels: str) -> Observe:
    """Adds to `metric`'s child with these label values, without the wrapper's checks (a gauge
    takes negative amounts); made once per label values. The event loop's thread only, as
    `observer`."""
    key = (metric, *labels)
    found = _INCREMENTERS.get(key)
    if found is None:
        found = _INCREMENTERS[key] = _add((metric.labels(*labels) if labels else metric)._value)
    return found


def _in_process(value: Any) -> bool:
    """A plain in-process value (not a shared file), safe to change without its lock from the
    event loop's thread: every request-path writer runs there, and a reader (the /metrics
    handler, also there, or a scrape under the GIL) sees a whole float either way."""
    return type(value) is MutexValue


def _observe(total: Any, buckets: list[Any], bounds: list[float]) -> Observe:
    if not _in_process(total):

        def observe_shared(amount: float) -> None:
            _defer(total, amount)
            _defer(buckets[bisect_left(bounds, amount)], 1.0)

        return observe_shared

    def observe(amount: float) -> None:
        total._value += amount
        buckets[bisect_left(bounds, amount)]._value += 1.0

    return observe


def _add(value: Any) -> Observe:
    if not _in_process(value):
        return functools.partial(_defer, value)

    def add(amount: float) -> None:
        value._value += amount

    return add


# Amounts the request path added to shared values (`--workers`) since the last flush.
_PENDING: dict[Any, float] = {}


def _defer(value: Any, amount: float) -> None:
    """Adds `amount` to the shared `value` at the end of this event-loop iteration (at once
    outside a loop). A shared value's `inc` takes a lock and writes its file: about 1.1 µs,
    some 38 times per request. Gathered, each value is written once per iteration for all
    the requests the iteration served; another worker's scrape sees them an iteration later."""
    pending = _PENDING
    first = not pending
    pending[value] = pending.get(value, 0.0) + amount
    if first:
        try:
            asyncio.get_running_loop().call_soon(flush_shared)
        except RuntimeError:  # no event loop: a command or a test
            flush_shared()


def flush_shared() -> None:
    """Writes what this process gathered for the shared values; before a scrape and at exit."""
    if not _PENDING:
        return
    gathered = list(_PENDING.items())
    _PENDING.clear()
    for value, amount in gathered:
        if amount:  # an in-flight gauge's +1 and -1 within one iteration cancel out
            value.inc(amount)
