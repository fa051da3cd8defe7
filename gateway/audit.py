"""The audit trail: one scrubbed, pseudonymous, hash-chained JSON event per request or incident.

Owns the event schema (OpenTelemetry GenAI and Elastic Common Schema names, flat dotted keys),
keyed-HMAC pseudonyms with rotation, address truncation, the final scrubber every sink shares,
the writer (sequence number and previous-event hash per process stream) and its sinks. Must
never write prompt or completion text, keys or tokens, emails or full addresses.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from gateway import metrics
from gateway.config import AuditSettings
from gateway.exchange import Exchange
from gateway.log import get_logger

GENESIS = "0" * 64
EPHEMERAL_KEY_ID = "ephemeral"
OPERATIONS = {"chat.completions": "chat", "responses": "chat", "completions": "text_completion",
              "embeddings": "embeddings", "models": "list_models"}  # fmt: skip
CHAIN_FIELDS = ("gateway.audit.stream", "gateway.audit.seq", "gateway.audit.prev_hash")
log = get_logger("gateway.audit")


class Pseudonymizer:
    """Keyed HMAC pseudonyms: `ps_` + 24 hex digits, stable per key, meaningless without it."""

    def __init__(
        self, keys: Sequence[tuple[str, bytes]], overlap_until: datetime | None = None
    ) -> None:
        self.keys = tuple(keys) or ((EPHEMERAL_KEY_ID, secrets.token_bytes(32)),)
        self.overlap_until = overlap_until

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> Pseudonymizer:
        keys = [(k.id, k.key.get_secret_value().encode()) for k in settings.pseudonym_keys]
        return cls(keys, settings.pseudonym_overlap_until)

    @property
    def key_id(self) -> str:
        return self.keys[0][0]

    def user(self, subject: str) -> str:
        return _pseudonym(self.keys[0][1], "user", subject)

    def tenant(self, tenant: str) -> str:
        return _pseudonym(self.keys[0][1], "tenant", tenant)

    def credential(self, secret: str) -> str:
        """A fingerprint of a presented credential, to count failures against one key."""
        return "kf_" + _hmac(self.keys[0][1], "credential", secret)[3:]

    def all_users(self, subject: str) -> list[tuple[str, str]]:
        """(key id, pseudonym) under every configured key: what the SOC searches for."""
        return [(kid, _hmac(key, "user", subject)) for kid, key in self.keys]

    def older_users(self, subject: str, now: datetime) -> list[str]:
        """Pseudonyms under the previous keys while the rotation overlap lasts."""
        if self.overlap_until is None or now >= _aware(self.overlap_until):
            return []
        return [_hmac(key, "user", subject) for _, key in self.keys[1:]]


def _hmac(key: bytes, domain: str, value: str) -> str:
    digest = hmac.new(key, f"{domain}:{value}".encode(), hashlib.sha256).hexdigest()
    return "ps_" + digest[:24]


@functools.lru_cache(maxsize=8192)
def _pseudonym(key: bytes, domain: str, value: str) -> str:
    """`_hmac` remembered for the identities seen lately: a principal sends many requests.
    Not for credentials, which must not linger in memory."""
    return _hmac(key, domain, value)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@functools.lru_cache(maxsize=4096)
def truncate_address(address: str) -> str | None:
    """The client's network, never its address: IPv4 /24, IPv6 /48 (as `net/len`)."""
    try:
        ip = ipaddress.ip_network(address.strip().split("%")[0], strict=False).network_address
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


_AGENTS = (("OpenAI/Python", "openai-python"), ("OpenAI/JS", "openai-node"), ("curl/", "curl"),
           ("python-requests/", "python-requests"), ("python-httpx/", "python-httpx"),
           ("aiohttp/", "aiohttp"), ("Go-http-client/", "go"), ("okhttp/", "okhttp"),
           ("PostmanRuntime/", "postman"), ("Edg/", "edge"), ("Firefox/", "firefox"),
           ("Chrome/", "chrome"), ("Safari/", "safari"), ("Mozilla/", "browser"))  # fmt: skip


def user_agent_family(agent: str | None) -> str | None:
    """A bounded family name; the free-text header itself is never logged."""
    if not agent:
        return None
    for marker, family in _AGENTS:
        if marker in agent:
            return family
    return "other"


_SHAPES = {
    "key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
    r"|\b(?:sk|pk|rk|gw|ghp|gho|ghu|ghs|ghr|glpat|xox[abposr]|AKIA|ASIA|AIza|github_pat|"
    r"sk_live|sk_test|rk_live)[A-Za-z0-9_\-]{12,}",
    "email": r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+",
    "token": r"(?i:\b(?:bearer|basic)\s+[A-Za-z0-9._~+/=\-]+)"
    r"|\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*",
    "address": r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:[0-9A-Fa-f]{1,4}:){4,7}[0-9A-Fa-f]{1,4}\b",
    "secret": r"[A-Za-z0-9_\-+/=]{32,}",
}
_SCRUB = re.compile("|".join(f"(?P<{name}>{shape})" for name, shape in _SHAPES.items()), re.S)
_OURS = re.compile(r"^(?:ps|kf)_[0-9a-f]{24}$")
_DIGIT = re.compile(r"[0-9]")
_TRUSTED = frozenset({"@timestamp", "source.address", *CHAIN_FIELDS})
_PLAIN = frozenset({int, float, bool, type(None)})
# Texts the scrubber left unchanged lately (model names, paths, actions): most strings of an
# event repeat on every request and the pattern costs a microsecond each. Bounded, and never
# holds a text that had anything to remove.
_CLEAN: set[str] = set()
_CLEAN_TEXTS = 4096


def scrub_text(text: str) -> str:
    """Removes anything shaped like an email, key, token, long secret or full address."""
    if len(text) < 7 or text in _CLEAN or _OURS.match(text):
        return text  # shorter than any shape (e.g. 1.2.3.4), or already found clean
    scrubbed = _SCRUB.sub(_mark, text)
    if scrubbed == text and len(text) <= 200:
        _remember_clean(text)
    return scrubbed


def _remember_clean(text: str) -> None:
    if len(_CLEAN) >= _CLEAN_TEXTS:
        _CLEAN.clear()
    _CLEAN.add(text)


def _mark(match: re.Match[str]) -> str:
    kind = match.lastgroup or "secret"
    if kind != "secret":
        return f"[{kind}]"
    # Long runs mixing upper case, lower case and digits are secrets; hex ids are not.
    # (The run is ASCII: it has an upper-case letter iff lower() changes it, and vice versa.)
    token = match.group(0)
    mixed = token.lower() != token and token.upper() != token
    return "[secret]" if mixed and _DIGIT.search(token) else token


def scrub(value: Any, key: str = "") -> Any:
    """The final pass every sink shares, over every string in the event."""
    if key in _TRUSTED:
        return value
    kind = type(value)
    if kind is str:
        return scrub_text(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {k: scrub(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class EventContext:
    """What a request event needs beyond the exchange."""

    names: Pseudonymizer
    provider_kinds: Mapping[str, str]
    pseudonymize_tenant: bool = True


def build_request_event(exchange: Exchange, context: EventContext, now: datetime) -> dict[str, Any]:
    """The audit event of one finished request (also one refused before the pipeline).

    Built already scrubbed (a fixed point of `scrub`, so the writer can skip its pass): every
    string that is not a constant of this module, a pseudonym or a truncated address goes
    through `scrub_text` here.
    """
    status = exchange.status or 499
    event: dict[str, Any] = {
        "@timestamp": iso(now),
        "event.kind": "event",
        "event.category": ["web"],
        "event.type": ["access"] if status < 400 else ["access", "denied"],
        "event.action": "gen_ai_request",
        "event.dataset": "gateway.audit",
        "event.outcome": "success" if status < 400 else "failure",
        "http.request.id": scrub_text(exchange.request_id),
        "http.request.method": scrub_text(exchange.method),
        "http.response.status_code": status,
        "url.path": scrub_text(exchange.path[:100]),
        "error.code": _scrubbed(exchange.error_code),
        "gateway.endpoint": scrub_text(exchange.endpoint),
        "gateway.stream": exchange.is_stream,
        "source.address": truncate_address(exchange.client_address),
        "user_agent.name": user_agent_family(exchange.headers.get("user-agent")),
        "gateway.ratelimit.outcome": _scrubbed(exchange.ratelimit_outcome),
        "gateway.anomalies": [scrub_text(a) for a in exchange.anomalies] or None,
    }
    event.update(_model_fields(exchange, context))
    event.update(_identity_fields(exchange, context, now))
    event.update(_timing_fields(exchange))
    event.update(_finding_fields(exchange))
    return {k: v for k, v in event.items() if v is not None}


def _scrubbed(text: str | None) -> str | None:
    return None if text is None else scrub_text(text)


def _model_fields(exchange: Exchange, context: EventContext) -> dict[str, Any]:
    route = exchange.route
    usage = exchange.usage
    asked = exchange.model if route is not None or exchange.model is None else "[unknown]"
    return {
        "gen_ai.operation.name": OPERATIONS.get(exchange.endpoint),
        "gen_ai.request.model": _scrubbed(asked),
        "gen_ai.response.model": scrub_text(route.upstream_model) if route else None,
        "gen_ai.system": _scrubbed(context.provider_kinds.get(exchange.provider or "")),
        "gateway.provider": _scrubbed(exchange.provider),
        "gateway.upstream.attempts": exchange.upstream_attempts or None,
        "gen_ai.usage.input_tokens": usage.prompt_tokens if usage else None,
        "gen_ai.usage.output_tokens": usage.completion_tokens if usage else None,
    }


def _identity_fields(exchange: Exchange, context: EventContext, now: datetime) -> dict[str, Any]:
    names = context.names
    fields: dict[str, Any] = {"gateway.pseudonym.key_id": scrub_text(names.key_id)}
    principal = exchange.principal
    if principal is None:
        if exchange.status == 401:
            fields["gateway.credential.fingerprint"] = _credential_fingerprint(exchange, names)
        return fields
    fields["user.id"] = names.user(principal.subject)
    fields["related.user"] = names.older_users(principal.subject, now) or None
    if principal.tenant:
        tenant, pseudonymize = principal.tenant, context.pseudonymize_tenant
        fields["organization.id"] = names.tenant(tenant) if pseudonymize else scrub_text(tenant)
    fields["gateway.auth.method"] = scrub_text(principal.method)
    fields["gateway.key.id"] = _scrubbed(principal.key_id)
    return fields


def _credential_fingerprint(exchange: Exchange, names: Pseudonymizer) -> str | None:
    headers = exchange.headers
    given = headers.get("authorization", "").removeprefix("Bearer ").strip()
    given = given or headers.get("api-key", "") or headers.get("x-api-key", "")
    return names.credential(given) if given else None


def _timing_fields(exchange: Exchange) -> dict[str, Any]:
    timings = exchange.timings
    if not timings.finished:
        timings.finished = time.perf_counter()
    total = timings.finished - timings.started
    upstream = None
    if timings.upstream_sent:
        upstream = (timings.upstream_done or timings.finished) - timings.upstream_sent
    first = timings.first_written - timings.started if timings.first_written else None
    return {
        "event.duration": int(total * 1e9),
        "gateway.latency.total_ms": _ms(total),
        "gateway.latency.upstream_ms": _ms(upstream),
        "gateway.latency.gateway_ms": _ms(timings.overhead()),
        "gateway.latency.first_chunk_ms": _ms(first),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _finding_fields(exchange: Exchange) -> dict[str, Any]:
    decisions = [
        {"policy.id": scrub_text(d.policy_id), "policy.version": scrub_text(d.policy_version),
         "rule.id": scrub_text(d.rule_id), "action": scrub_text(d.action),
         "mode": scrub_text(d.mode), "severity": scrub_text(d.severity),
         "direction": scrub_text(d.direction), "policy_set.hash": scrub_text(d.policy_set_hash)}
        for d in exchange.decisions
    ]  # fmt: skip
    return {
        "gateway.redactions": dict(exchange.redaction_counts) or None,
        "gateway.redactions.total": sum(exchange.redaction_counts.values()) or None,
        "gateway.policy.decisions": decisions or None,
        "rule.id": [scrub_text(r) for r in sorted({d.rule_id for d in exchange.decisions})] or None,
    }


def security_event(
    action: str,
    *,
    category: str,
    outcome: str = "unknown",
    kind: str = "event",
    fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A security event (auth failure, admin action, policy reload, anomaly) with ECS fields."""
    event: dict[str, Any] = {
        "event.kind": kind,
        "event.category": [category],
        "event.action": action,
        "event.dataset": "gateway.security",
        "event.outcome": outcome,
    }
    event.update({k: v for k, v in (fields or {}).items() if v is not None})
    if isinstance(event.get("source.address"), str):
        event["source.address"] = truncate_address(event["source.address"])
    return event


def iso(moment: datetime) -> str:
    """UTC, to the millisecond, with `Z`: `isoformat` cost a microsecond, so the text of the
    whole second is formatted once and only the milliseconds per event."""
    utc = moment if moment.tzinfo is UTC else _aware(moment).astimezone(UTC)
    second = _second(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second)
    return f"{second}.{utc.microsecond // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(year: int, month: int, day: int, hour: int, minute: int, second: int) -> str:
    return datetime(year, month, day, hour, minute, second).isoformat()


def event_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical serialization (sorted keys, compact) of one written event."""
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Sink(Protocol):
    """Where events go: `write` takes one line (no newline) and may hold it until `flush`;
    `close` flushes. Errors are `OSError`."""

    name: str

    def write(self, line: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    """The process's structlog output (stdout unless reconfigured), one line per event, the
    lines held until `flush` write in one call."""

    name = "stdout"

    def __init__(self) -> None:
        self._pending: list[str] = []

    def write(self, line: str) -> None:
        self._pending.append(line)

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        structlog.get_config()["logger_factory"]().msg("\n".join(lines))

    def close(self) -> None:
        """Flushes; the stream itself belongs to the logging configuration."""
        self.flush()


class RotatingFileSink:
    """Appends lines to `path`; past `max_bytes` it shifts path.1 .. path.N and starts afresh."""

    name = "file"

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._size = self._file.tell()  # including the lines held in `_pending`
        self._pending: list[str] = []

    def write(self, line: str) -> None:
        size = (len(line) if line.isascii() else len(line.encode())) + 1
        if self._size and self._size + size > self.max_bytes:
            self.flush()
            self._rotate()
        self._pending.append(line)
        self._size += size

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("a", encoding="utf-8")
        self._size = 0

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._file.close()


class AuditWriter:
    """Numbers, chains, scrubs and writes events to every sink (one chain per process stream).

    Inside an event loop the sinks are flushed once per loop iteration (all the events of
    the iteration in one write), so the lines reach the operating system before the loop
    does anything else; outside one, after every event. `close` flushes what is left.
    """

    def __init__(
        self, sinks: Sequence[Sink], *, clock: Callable[[], datetime] | None = None
    ) -> None:
        self._sinks = tuple(sinks)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._pid = os.getpid()  # opened in the process that writes (each worker its own)
        self.stream = f"{self._pid}-{secrets.token_hex(4)}"
        self._seq = 0
        self._previous = GENESIS
        self._unflushed = 0
        self._flushing: asyncio.Handle | None = None
        self._counters: dict[str, Callable[[], None]] = {}

    def write(self, event: Mapping[str, Any], *, scrubbed: bool = False) -> None:
        """Chains and writes `event`, scrubbed first unless the caller built it scrubbed
        (`build_request_event` does: it is its own `scrub`)."""
        record: dict[str, Any] = dict(event) if scrubbed else scrub(event)
        if "@timestamp" not in record:
            record["@timestamp"] = iso(self._clock())
        self._seq += 1
        record["gateway.audit.stream"] = self.stream
        record["gateway.audit.seq"] = self._seq
        record["gateway.audit.prev_hash"] = self._previous
        record["process.pid"] = self._pid
        line = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        self._previous = hashlib.sha256(line).hexdigest()
        text = line.decode()
        for sink in self._sinks:
            try:
                sink.write(text)
            except OSError as exc:
                self._failed(sink, exc, 1)
        self._count(record.get("event.dataset", "gateway.audit"))
        self._unflushed += 1
        self._schedule_flush()

    def _count(self, dataset: str) -> None:
        count = self._counters.get(dataset)
        if count is None:  # the labelled counter, looked up once per dataset
            count = self._counters[dataset] = metrics.AUDIT_EVENTS.labels(dataset).inc
        count()

    def _schedule_flush(self) -> None:
        if self._flushing is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: a command or a test
            self.flush()
            return
        self._flushing = loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hands the events written so far to every sink's destination."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        unflushed, self._unflushed = self._unflushed, 0
        for sink in self._sinks:
            try:
                sink.flush()
            except OSError as exc:
                self._failed(sink, exc, unflushed)

    def _failed(self, sink: Sink, exc: OSError, events: int) -> None:
        metrics.AUDIT_WRITE_ERRORS.labels(sink.name).inc(events)
        log.error("audit_write_failed", sink=sink.name, error=exc.strerror)

    def now(self) -> datetime:
        return self._clock()

    def close(self) -> None:
        self.flush()
        for sink in self._sinks:
            sink.close()


def open_writer(settings: AuditSettings) -> AuditWriter:
    """The writer with the configured sinks; installs it for `emit_security_event`."""
    sinks: list[Sink] = []
    if "stdout" in settings.sinks:
        sinks.append(StdoutSink())
    if "file" in settings.sinks:
        sinks.append(RotatingFileSink(settings.file_path, settings.file_max_bytes,
                                      settings.file_backups))  # fmt: skip
    writer = AuditWriter(sinks)
    _INSTALLED.append(writer)
    if not settings.pseudonym_keys:
        log.warning("audit_pseudonym_key_ephemeral",
                    hint="set audit.pseudonym_keys so pseudonyms survive restarts")  # fmt: skip
    return writer


def close_writer(writer: AuditWriter) -> None:
    if writer in _INSTALLED:
        _INSTALLED.remove(writer)
    writer.close()


# The process's open writer, like structlog's configuration: one per process, set at startup,
# so that any module can report a security event without being handed the writer.
_INSTALLED: list[AuditWriter] = []


def emit_security_event(
    action: str,
    *,
    category: str,
    outcome: str = "unknown",
    kind: str = "event",
    fields: Mapping[str, Any] | None = None,
) -> None:
    """Writes a security event to the audit sinks (to the log when audit is off).

    `category` is an ECS event category (`authentication`, `iam`, `configuration`,
    `intrusion_detection`); `fields` are flat ECS keys such as `source.address` (truncated
    here), `user.id` (a pseudonym: see `Pseudonymizer`) or `rule.id`. The scrubber still runs.
    """
    event = security_event(action, category=category, outcome=outcome, kind=kind, fields=fields)
    if _INSTALLED:
        _INSTALLED[-1].write(event)
        return
    log.warning("security_event", **{k.replace(".", "_"): v for k, v in scrub(event).items()})
