"""The audit trail: one scrubbed, pseudonymous, hash-chained JSON event per request or incident.

Owns security events (ECS names, flat dotted keys; request events are built in
`gateway.audit_event`) and the writer (sequence number and previous-event hash per process
stream), which scrubs every event (`gateway.audit_privacy`) before its sinks
(`gateway.audit_sinks`) see it. Must never write prompt or completion text, keys or tokens,
emails or full addresses.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway import metrics
from gateway.audit_event import iso
from gateway.audit_privacy import scrub, truncate_address
from gateway.audit_sinks import RotatingFileSink, Sink, StdoutSink
from gateway.config import AuditSettings
from gateway.log import get_logger

GENESIS = "0" * 64
log = get_logger("gateway.audit")


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


def event_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical serialization (sorted keys, compact) of one written event."""
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


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
        self._clock = clock or functools.partial(datetime.now, UTC)
        self._pid = os.getpid()  # opened in the process that writes (each worker its own)
        self.stream = f"{self._pid}-{secrets.token_hex(4)}"
        self._seq = 0
        self._previous = GENESIS
        self._unflushed = 0
        self._flushing: asyncio.Handle | None = None
        self._counters: dict[str, Callable[[float], None]] = {}
        self._count_request = self._counter("gateway.audit")

    def write(self, event: Mapping[str, Any], *, scrubbed: bool = False) -> None:
        """Chains and writes `event`, scrubbed first unless the caller built it scrubbed, and
        serialized with sorted keys. (A request event goes through `write_request`.)"""
        record = dict(event) if scrubbed else scrub(event)
        if "@timestamp" not in record:
            record["@timestamp"] = iso(self._clock())
        count = self._counter(record.get("event.dataset", "gateway.audit"))
        self._append(record, orjson.OPT_SORT_KEYS, count)

    def write_request(self, event: dict[str, Any]) -> None:
        """Chains and writes a request event as `build_request_event` built it: scrubbed (it
        is its own `scrub`) and ordered (its keys come sorted, the chain fields and
        `process.pid` among them). It is handed over: its chain fields are filled in place and
        it is serialized as it stands, without a copy, a scrub or a sort."""
        self._append(event, 0, self._count_request)

    def _append(self, record: dict[str, Any], option: int, count: Callable[[float], None]) -> None:
        """Numbers and chains `record`, hands its line to every sink and counts it."""
        self._seq += 1
        record["gateway.audit.stream"] = self.stream
        record["gateway.audit.seq"] = self._seq
        record["gateway.audit.prev_hash"] = self._previous
        record["process.pid"] = self._pid
        line = orjson.dumps(record, option=option)
        self._previous = hashlib.sha256(line).hexdigest()
        text = line.decode()
        for sink in self._sinks:
            try:
                sink.write(text)
            except OSError as exc:
                self._failed(sink, exc, 1)
        count(1)
        self._unflushed += 1
        if self._flushing is None:
            self._schedule_flush()

    def _counter(self, dataset: str) -> Callable[[float], None]:
        """The labelled counter of `dataset`'s events, looked up once per dataset."""
        count = self._counters.get(dataset)
        if count is None:
            count = self._counters[dataset] = metrics.incrementer(metrics.AUDIT_EVENTS, dataset)
        return count

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: a command or a test
            self.flush()
            return
        self._flushing = loop.call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self._flushing = None  # running: nothing to cancel
        self.flush()

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
