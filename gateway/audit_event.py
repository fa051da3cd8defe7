"""The request event: one finished request as an audit event, built scrubbed and in order.

Owns the event schema of requests (OpenTelemetry GenAI and Elastic Common Schema names, flat
dotted keys), remembering the event of each request shape seen lately (only the per-request
fields are set again), and the timestamp format of every audit event. Must never put prompt
or completion text, keys or tokens, emails or full addresses in an event; must not number,
chain or write events (`gateway.audit` does).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.audit_privacy import (
    Pseudonymizer,
    aware,
    scrub_text,
    truncate_address,
    user_agent_family,
)
from gateway.exchange import Exchange, PolicyDecision

OPERATIONS = {"chat.completions": "chat", "responses": "chat", "completions": "text_completion",
              "embeddings": "embeddings", "models": "list_models"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class EventContext:
    """What a request event needs beyond the exchange."""

    names: Pseudonymizer
    provider_kinds: Mapping[str, str]
    pseudonymize_tenant: bool = True


Shapes = dict[tuple[Any, ...], dict[str, Any]]
"""The events of the request shapes seen lately, by shape (see `build_request_event`)."""
SHAPES = 512  # the request shapes remembered by one owner (each one event, a few kB)


def build_request_event(
    exchange: Exchange, context: EventContext, now: datetime, *, shapes: Shapes | None = None
) -> dict[str, Any]:
    """The audit event of one finished request (also one refused before the pipeline).

    Built already scrubbed (a fixed point of `scrub`, so the writer can skip its pass): every
    string that is not a constant of this module, a pseudonym or a truncated address goes
    through `scrub_text` here. Built in canonical order too: its keys, nested ones included,
    come as `OPT_SORT_KEYS` sorts them, the writer's chain fields in their places holding
    placeholders (`AuditWriter.write_request` fills them and skips the sort). Hence one literal
    in that order, whatever subject each key belongs to.

    Most fields repeat between the requests of one shape (caller, route, outcome, client
    family, and which of the per-request fields are written): given `shapes` (its caller's
    cache), the event of a shape seen lately is copied and only the per-request fields
    (`_fill`) are set again, in their places.
    """
    address = truncate_address(exchange.client_address)
    if shapes is None:
        event = _event(exchange, context, now)
        _fill(event, exchange, now, address)
        return event
    shape = _shape(exchange, context, now, address)
    known = shapes.get(shape) if shape is not None else None
    if known is None:
        known = _event(exchange, context, now)
        if shape is not None:
            _remember(shapes, shape, known, exchange)
    event = known.copy()
    _fill(event, exchange, now, address)
    return event


def _fill(event: dict[str, Any], exchange: Exchange, now: datetime, address: str | None) -> None:
    """Sets the fields that change from one request to the next of a shape (its present
    ones: the shape says which, so each is in its place already)."""
    duration, total, upstream, overhead, first = _timing(exchange)
    event["@timestamp"] = iso(now)
    event["event.duration"] = duration
    if first is not None:
        event["gateway.latency.first_chunk_ms"] = first
    event["gateway.latency.gateway_ms"] = overhead
    event["gateway.latency.total_ms"] = total
    if upstream is not None:
        event["gateway.latency.upstream_ms"] = upstream
    usage = exchange.usage
    if usage is not None:
        event["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        event["gen_ai.usage.output_tokens"] = usage.completion_tokens
    event["http.request.id"] = scrub_text(exchange.request_id)
    if address is not None:
        event["source.address"] = address


def _shape(
    exchange: Exchange, context: EventContext, now: datetime, address: str | None
) -> tuple[Any, ...] | None:
    """Everything the fields `_fill` does not set follow from, and which of those it sets;
    None for an event not to remember (a refused credential's fingerprint must not stay)."""
    principal, route, timings = exchange.principal, exchange.route, exchange.timings
    who: tuple[Any, ...] | None = None
    if principal is not None:
        who = (principal.subject, principal.tenant, principal.key_id, principal.method,
               context.names.overlapping(now))  # fmt: skip
    elif exchange.status == 401:
        return None
    return (who, exchange.endpoint, exchange.method, exchange.path, _asked(exchange),
            route.upstream_model if route else None, exchange.provider, exchange.status,
            exchange.error_code, exchange.ratelimit_outcome, exchange.is_stream,
            exchange.upstream_attempts, tuple(exchange.redaction_counts.items()),
            tuple(exchange.decisions), tuple(exchange.anomalies),
            user_agent_family(exchange.headers.get("user-agent")), exchange.usage is None,
            address is None, not timings.upstream_sent, not timings.first_written)  # fmt: skip


def _remember(
    shapes: Shapes,
    shape: tuple[Any, ...],
    event: dict[str, Any],
    exchange: Exchange,
) -> None:
    """Keeps `event` for its shape unless a text of the shape had something to remove: the
    scrubber's own rule for what it remembers. (The subject and tenant stay, as in the
    pseudonyms' cache.)"""
    principal = exchange.principal
    texts = [exchange.path, exchange.method, exchange.error_code, exchange.ratelimit_outcome,
             exchange.provider, *shape[4:6], *exchange.anomalies,
             *((principal.key_id, principal.method) if principal else ())]  # fmt: skip
    if any(text is not None and scrub_text(text) != text for text in texts):
        return
    if len(shapes) >= SHAPES:
        shapes.clear()
    shapes[shape] = event


def _asked(exchange: Exchange) -> str | None:
    """The model asked for, as written: a name the catalog does not know is not."""
    model = exchange.model
    return model if exchange.route is not None or model is None else "[unknown]"


def _event(exchange: Exchange, context: EventContext, now: datetime) -> dict[str, Any]:
    """The event, built field by field (what the first request of a shape costs)."""
    status = exchange.status or 499
    failed = status >= 400
    route, usage, decisions = exchange.route, exchange.usage, exchange.decisions
    key, user, older, tenant, method, key_id, fingerprint = _identity(exchange, context, now)
    duration, total, upstream, overhead, first = _timing(exchange)
    event: dict[str, Any] = {
        "@timestamp": iso(now),
        "error.code": _scrubbed(exchange.error_code),
        "event.action": "gen_ai_request",
        "event.category": ["web"],
        "event.dataset": "gateway.audit",
        "event.duration": duration,
        "event.kind": "event",
        "event.outcome": "failure" if failed else "success",
        "event.type": ["access", "denied"] if failed else ["access"],
        "gateway.anomalies": [scrub_text(a) for a in exchange.anomalies] or None,
        "gateway.audit.prev_hash": "",  # the writer's chain fields (and `process.pid`)
        "gateway.audit.seq": 0,
        "gateway.audit.stream": "",
        "gateway.auth.method": method,
        "gateway.credential.fingerprint": fingerprint,
        "gateway.endpoint": scrub_text(exchange.endpoint),
        "gateway.key.id": key_id,
        "gateway.latency.first_chunk_ms": first,
        "gateway.latency.gateway_ms": overhead,
        "gateway.latency.total_ms": total,
        "gateway.latency.upstream_ms": upstream,
        "gateway.policy.decisions": [_decision(d) for d in decisions] or None,
        "gateway.provider": _scrubbed(exchange.provider),
        "gateway.pseudonym.key_id": key,
        "gateway.ratelimit.outcome": _scrubbed(exchange.ratelimit_outcome),
        "gateway.redactions": _counts(exchange.redaction_counts),
        "gateway.redactions.total": sum(exchange.redaction_counts.values()) or None,
        "gateway.stream": exchange.is_stream,
        "gateway.upstream.attempts": exchange.upstream_attempts or None,
        "gen_ai.operation.name": OPERATIONS.get(exchange.endpoint),
        "gen_ai.request.model": _scrubbed(_asked(exchange)),
        "gen_ai.response.model": scrub_text(route.upstream_model) if route else None,
        "gen_ai.system": _scrubbed(context.provider_kinds.get(exchange.provider or "")),
        "gen_ai.usage.input_tokens": usage.prompt_tokens if usage else None,
        "gen_ai.usage.output_tokens": usage.completion_tokens if usage else None,
        "http.request.id": scrub_text(exchange.request_id),
        "http.request.method": scrub_text(exchange.method),
        "http.response.status_code": status,
        "organization.id": tenant,
        "process.pid": 0,
        "related.user": older,
        "rule.id": [scrub_text(r) for r in sorted({d.rule_id for d in decisions})] or None,
        "source.address": truncate_address(exchange.client_address),
        "url.path": scrub_text(exchange.path[:100]),
        "user.id": user,
        "user_agent.name": user_agent_family(exchange.headers.get("user-agent")),
    }
    return {k: v for k, v in event.items() if v is not None}


def _scrubbed(text: str | None) -> str | None:
    return None if text is None else scrub_text(text)


_Identity = tuple[str, str | None, list[str] | None, str | None, str | None, str | None,
                  str | None]  # fmt: skip


def _identity(exchange: Exchange, context: EventContext, now: datetime) -> _Identity:
    """Who made the request, as the event names them: the pseudonym key id, then the user,
    the user under older keys, the tenant, the auth method, the key id and the fingerprint
    of a refused credential (None: not written)."""
    names = context.names
    key = scrub_text(names.key_id)
    principal = exchange.principal
    if principal is None:
        fingerprint = _credential_fingerprint(exchange, names) if exchange.status == 401 else None
        return key, None, None, None, None, None, fingerprint
    tenant = principal.tenant
    if tenant:
        tenant = names.tenant(tenant) if context.pseudonymize_tenant else scrub_text(tenant)
    subject = principal.subject
    user, older = names.user(subject), names.older_users(subject, now) or None
    return (
        key,
        user,
        older,
        tenant or None,
        scrub_text(principal.method),
        _scrubbed(principal.key_id),
        None,
    )


def _credential_fingerprint(exchange: Exchange, names: Pseudonymizer) -> str | None:
    headers = exchange.headers
    given = headers.get("authorization", "").removeprefix("Bearer ").strip()
    given = given or headers.get("api-key", "") or headers.get("x-api-key", "")
    return names.credential(given) if given else None


def _timing(exchange: Exchange) -> tuple[int, float, float | None, float, float | None]:
    """The duration (ns) and the total, upstream, gateway and first-chunk latencies (ms)."""
    timings = exchange.timings
    if not timings.finished:
        timings.finished = time.perf_counter()
    total = timings.finished - timings.started
    upstream = None
    if timings.upstream_sent:
        upstream = round(((timings.upstream_done or timings.finished) - timings.upstream_sent)
                         * 1000, 3)  # fmt: skip
    first = None
    if timings.first_written:
        first = round((timings.first_written - timings.started) * 1000, 3)
    overhead = round(timings.overhead() * 1000, 3)
    return int(total * 1e9), round(total * 1000, 3), upstream, overhead, first


def _counts(counts: Mapping[str, int]) -> dict[str, int] | None:
    return dict(sorted(counts.items())) if counts else None


def _decision(d: PolicyDecision) -> dict[str, str]:
    return {"action": scrub_text(d.action), "direction": scrub_text(d.direction),
            "mode": scrub_text(d.mode), "policy.id": scrub_text(d.policy_id),
            "policy.version": scrub_text(d.policy_version),
            "policy_set.hash": scrub_text(d.policy_set_hash), "rule.id": scrub_text(d.rule_id),
            "severity": scrub_text(d.severity)}  # fmt: skip


def iso(moment: datetime) -> str:
    """UTC, to the millisecond, with `Z`: `isoformat` cost a microsecond, so the text of the
    whole second is formatted once, and the milliseconds' text is looked up."""
    utc = moment if moment.tzinfo is UTC else aware(moment).astimezone(UTC)
    second = _second(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second)
    return second + _MILLISECONDS[utc.microsecond // 1000]


_MILLISECONDS = tuple(f".{n:03d}Z" for n in range(1000))


@functools.lru_cache(maxsize=4)
def _second(year: int, month: int, day: int, hour: int, minute: int, second: int) -> str:
    return datetime(year, month, day, hour, minute, second).isoformat()
