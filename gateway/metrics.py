"""Prometheus collectors of the gateway; nothing else lives at module level.

Owns metric names, help texts and label sets. Labels take bounded values only (route names,
configured model names, status codes, stage names): never ids, keys, users or free text.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
