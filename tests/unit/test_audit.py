"""The audit event, the writer and its sinks, the hash chain and its verification."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from faker import Faker
from prometheus_client import REGISTRY

from gateway import audit, audit_event
from gateway.audit import GENESIS, AuditWriter, emit_security_event
from gateway.audit_event import EventContext, build_request_event
from gateway.audit_privacy import (
    scrub,
)
from gateway.audit_sinks import RotatingFileSink, StdoutSink
from gateway.audit_verify import read_lines, verify
from gateway.exchange import Exchange, PolicyDecision, Principal, Route, Usage
from gateway.log import configure_logging
from tests.fakes.audit_values import fake_jwt, names, secret
from tests.fakes.sinks import ListSink

NOW = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)


def exchange(**overrides) -> Exchange:
    fields = dict(
        request_id="req_0123456789abcdef0123456789abcdef",
        endpoint="chat.completions",
        method="POST",
        path="/v1/chat/completions",
        headers={"user-agent": "OpenAI/Python 1.50.0"},
        client_address="203.0.113.77",
    )
    fields.update(overrides)
    return Exchange(**fields)


# --- pseudonyms --------------------------------------------------------------------------------


# --- the request event ---------------------------------------------------------------------------


def full_exchange() -> Exchange:
    ex = exchange()
    ex.model = "fast"
    ex.route = Route("fast", "fake", "llama-3.1-8b")
    ex.provider = "fake"
    ex.is_stream = True
    ex.status = 400
    ex.error_code = "content_policy_violation"
    ex.principal = Principal("alice@example.org", tenant="acme", key_id="key_1", method="api_key")
    ex.usage = Usage(12, 30)
    ex.redaction_counts = {"EMAIL_ADDRESS": 2, "PERSON": 1}
    ex.decisions = [
        PolicyDecision("injection", "3", "override_phrase", "block", "high", "enforce", "request",
                       "abc123"),
    ]  # fmt: skip
    ex.ratelimit_outcome = "allowed"
    ex.anomalies = ["new_model"]
    ex.timings.upstream_sent = ex.timings.started + 0.010
    ex.timings.first_chunk = ex.timings.started + 0.050
    ex.timings.first_written = ex.timings.started + 0.052
    ex.timings.upstream_done = ex.timings.started + 0.200
    ex.timings.finished = ex.timings.started + 0.205
    return ex


def test_a_request_event_has_every_field_under_ecs_and_otel_names():
    event = build_request_event(full_exchange(), EventContext(names(), {"fake": "openai"}), NOW)
    assert event["@timestamp"] == "2024-05-01T09:30:00.000Z"
    assert event["event.outcome"] == "failure"
    assert event["http.response.status_code"] == 400
    assert event["error.code"] == "content_policy_violation"
    assert event["url.path"] == "/v1/chat/completions"
    assert event["gen_ai.request.model"] == "fast"
    assert event["gen_ai.response.model"] == "llama-3.1-8b"
    assert event["gen_ai.system"] == "openai"
    assert event["gen_ai.usage.input_tokens"] == 12
    assert event["gen_ai.usage.output_tokens"] == 30
    assert event["gateway.stream"] is True
    assert event["user.id"] == names().user("alice@example.org")
    assert event["organization.id"] == names().tenant("acme")
    assert event["gateway.pseudonym.key_id"] == "k2"
    assert event["gateway.key.id"] == "key_1"
    assert event["source.address"] == "203.0.113.0/24"
    assert event["user_agent.name"] == "openai-python"
    assert event["gateway.redactions"] == {"EMAIL_ADDRESS": 2, "PERSON": 1}
    assert event["gateway.policy.decisions"][0]["rule.id"] == "override_phrase"
    assert event["gateway.policy.decisions"][0]["policy_set.hash"] == "abc123"
    assert event["rule.id"] == ["override_phrase"]
    assert event["gateway.ratelimit.outcome"] == "allowed"
    assert event["gateway.anomalies"] == ["new_model"]
    assert event["gateway.latency.total_ms"] == pytest.approx(205, abs=0.01)
    assert event["gateway.latency.upstream_ms"] == pytest.approx(190, abs=0.01)
    assert event["gateway.latency.first_chunk_ms"] == pytest.approx(52, abs=0.01)
    assert "alice" not in json.dumps(event) and "203.0.113.77" not in json.dumps(event)


def test_the_tenant_can_be_written_plainly():
    context = EventContext(names(), {}, pseudonymize_tenant=False)
    assert build_request_event(full_exchange(), context, NOW)["organization.id"] == "acme"


def test_a_refused_login_carries_a_fingerprint_never_the_credential():
    key = secret("sk-", 48)
    ex = exchange(headers={"authorization": f"Bearer {key}"})
    ex.status, ex.error_code = 401, "invalid_api_key"
    event = build_request_event(ex, EventContext(names(), {}), NOW)
    assert event["gateway.credential.fingerprint"] == names().credential(key)
    assert key not in json.dumps(event)
    assert "user.id" not in event


def test_an_unknown_model_name_is_not_written():
    ex = exchange()
    ex.model, ex.status = Faker().name(), 404
    event = build_request_event(ex, EventContext(names(), {}), NOW)
    assert event["gen_ai.request.model"] == "[unknown]"


# --- the writer, the chain and verification -----------------------------------------------------


def write_events(writer: AuditWriter, count: int) -> None:
    for index in range(count):
        writer.write({"event.dataset": "gateway.audit", "n": index, "note": f"x {index}"})


def test_events_are_numbered_and_chained_identically_on_every_sink():
    first, second = ListSink(), ListSink()
    writer = AuditWriter([first, second], clock=lambda: NOW)
    write_events(writer, 3)
    assert first.lines == second.lines
    records = [json.loads(line) for line in first.lines]
    assert [r["gateway.audit.seq"] for r in records] == [1, 2, 3]
    assert records[0]["gateway.audit.prev_hash"] == GENESIS
    assert (
        records[1]["gateway.audit.prev_hash"] == hashlib.sha256(first.lines[0].encode()).hexdigest()
    )
    assert {r["gateway.audit.stream"] for r in records} == {writer.stream}


def test_the_writer_scrubs_before_any_sink_sees_the_event():
    sink = ListSink()
    email = Faker().email()
    AuditWriter([sink]).write({"event.dataset": "gateway.security", "detail": email})
    assert email not in sink.lines[0] and "[email]" in sink.lines[0]


def chained_file(tmp_path: Path, count: int = 6) -> Path:
    path = tmp_path / "audit.log"
    sink = RotatingFileSink(path, 10**9, 2)
    write_events(AuditWriter([sink]), count)
    sink.close()
    return path


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_verify_accepts_an_untouched_log_with_other_lines_between(tmp_path):
    path = chained_file(tmp_path)
    lines = lines_of(path)
    lines.insert(2, '{"event": "gateway_started", "level": "info"}')
    path.write_text("\n".join(lines) + "\n")
    verdict = verify(read_lines([path]))
    assert verdict.intact and verdict.events == 6 and verdict.streams == 1


def test_verify_pinpoints_a_deleted_line(tmp_path):
    path = chained_file(tmp_path)
    lines = lines_of(path)
    del lines[2]
    path.write_text("\n".join(lines) + "\n")
    problems = verify(read_lines([path])).problems
    assert [(p.kind, p.where) for p in problems] == [("gap", f"{path}:3")]
    assert "seq 3 missing" in problems[0].detail


def test_verify_pinpoints_an_edited_line(tmp_path):
    path = chained_file(tmp_path)
    lines = lines_of(path)
    lines[3] = lines[3].replace('"x 3"', '"x 33"')
    path.write_text("\n".join(lines) + "\n")
    problems = verify(read_lines([path])).problems
    assert [(p.kind, p.where) for p in problems] == [("edited", f"{path}:4")]


def test_verify_pinpoints_a_reordered_line(tmp_path):
    path = chained_file(tmp_path)
    lines = lines_of(path)
    lines[1], lines[4] = lines[4], lines[1]
    path.write_text("\n".join(lines) + "\n")
    problems = verify(read_lines([path])).problems
    assert {(p.kind, p.where) for p in problems} == {
        ("reordered", f"{path}:3"),
        ("reordered", f"{path}:4"),
        ("reordered", f"{path}:5"),
    }


def test_rotated_files_verify_together_in_order(tmp_path):
    path = tmp_path / "audit.log"
    sink = RotatingFileSink(path, 4096, 5)
    writer = AuditWriter([sink])
    write_events(writer, 40)
    sink.close()
    rotated = sorted(tmp_path.glob("audit.log.*"), key=lambda p: -int(p.suffix[1:]))
    assert rotated, "the sink should have rotated"
    assert all(p.stat().st_size <= 4096 for p in [*rotated, path])
    assert verify(read_lines([*rotated, path])).intact
    alone = verify(read_lines([path]))
    assert alone.intact and "starts at seq" in alone.notes[0]


def test_security_events_go_through_the_installed_writer():
    sink = ListSink()
    writer = AuditWriter([sink])
    audit._INSTALLED.append(writer)
    try:
        emit_security_event(
            "auth_failure",
            category="authentication",
            outcome="failure",
            fields={"source.address": "198.51.100.23", "event.reason": "expired"},
        )
    finally:
        audit.close_writer(writer)
    record = json.loads(sink.lines[0])
    assert record["event.dataset"] == "gateway.security"
    assert record["event.action"] == "auth_failure"
    assert record["event.category"] == ["authentication"]
    assert record["source.address"] == "198.51.100.0/24"
    assert record["gateway.audit.seq"] == 1


def test_security_events_fall_back_to_the_log_when_audit_is_off():
    buffer = io.StringIO()
    configure_logging("info", "json", stream=buffer)
    try:
        emit_security_event("policy_reload", category="configuration", outcome="success")
    finally:
        configure_logging("info", "json")
    line = json.loads(buffer.getvalue())
    assert line["event"] == "security_event" and line["event_action"] == "policy_reload"


def test_events_written_without_an_event_loop_reach_the_file_at_once(tmp_path):
    path = tmp_path / "audit.log"
    sink = RotatingFileSink(path, 10**9, 2)
    write_events(AuditWriter([sink]), 2)
    assert len(lines_of(path)) == 2
    sink.close()


# --- cheaper forms of the same output -------------------------------------------------------------


def isoformat(moment: datetime) -> str:
    """The formula `iso` replaces: what every event's timestamp must keep looking like."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def moments() -> list[datetime]:
    edges = [datetime(2024, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
             datetime(2025, 1, 1, 0, 0, 0, 0, tzinfo=UTC),
             datetime(2024, 2, 29, 12, 0, 0, 999, tzinfo=UTC),
             datetime(2024, 2, 29, 12, 0, 0, 1000, tzinfo=UTC),
             datetime(999, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC),
             datetime(2024, 5, 1, 11, 30, 0, 500_000, tzinfo=timezone(timedelta(hours=2))),
             datetime(2024, 5, 1, 9, 30, 0, 250_000)]  # fmt: skip
    start = datetime(2024, 5, 1, 9, 29, 59, 990_000, tzinfo=UTC)
    return edges + [start + timedelta(microseconds=997 * step) for step in range(40)]


@pytest.mark.parametrize("moment", moments())
def test_timestamps_match_isoformat_across_second_boundaries(moment):
    assert audit_event.iso(moment) == isoformat(moment)


def test_timestamps_stay_right_when_seconds_come_back_out_of_order():
    for moment in [*moments(), *reversed(moments())]:
        assert audit_event.iso(moment) == isoformat(moment)


def hostile_exchange(leak: list[str]) -> Exchange:
    """Every field a client, a token or a config file fills, holding a personal or secret value."""
    ex = full_exchange()
    ex.request_id, ex.path, ex.method = leak[1], f"/v1/{leak[0]}/x", leak[4]
    ex.error_code, ex.ratelimit_outcome, ex.anomalies = leak[2], leak[3], [leak[0]]
    ex.route = Route(leak[0], leak[1], leak[2])
    ex.model, ex.provider = leak[3], leak[4]
    ex.principal = Principal(leak[0], tenant=leak[1], key_id=leak[2], method=leak[3])
    ex.decisions = [PolicyDecision(*leak, leak[0], leak[1], leak[2])]
    return ex


def leaks(seed: int) -> list[str]:
    fake = Faker()
    fake.seed_instance(seed)
    return [fake.email(), secret("sk-", 48), fake.ipv4_public(), fake_jwt(), secret("", 40)]


@pytest.mark.parametrize("pseudonymize_tenant", [True, False])
def test_a_request_event_is_built_scrubbed(pseudonymize_tenant):
    leak = leaks(5)
    context = EventContext(names(), {leak[4]: leak[0]}, pseudonymize_tenant)
    event = build_request_event(hostile_exchange(leak), context, NOW)
    assert scrub(event) == event
    text = json.dumps(event)
    assert "[email]" in text and "[secret]" in text
    assert [value for value in leak if value in text] == []


def test_the_writer_skips_its_scrub_only_for_events_built_scrubbed():
    sink = ListSink()
    writer = AuditWriter([sink], clock=lambda: NOW)
    event = build_request_event(hostile_exchange(leaks(6)), EventContext(names(), {}), NOW)
    writer.write(event, scrubbed=True)
    writer.write(event)
    first, second = (json.loads(line) for line in sink.lines)
    chain = {"gateway.audit.seq", "gateway.audit.prev_hash"}
    assert {k: v for k, v in first.items() if k not in chain} == {
        k: v for k, v in second.items() if k not in chain
    }


def refused_exchange() -> Exchange:
    ex = exchange(headers={"authorization": f"Bearer {secret('sk-', 48)}"})
    ex.status, ex.error_code = 401, "invalid_api_key"
    return ex


def plain_exchange() -> Exchange:
    ex = exchange(headers={})
    ex.principal = Principal("bob", tenant="", method="jwt")
    ex.redaction_counts = {"PHONE_NUMBER": 1, "EMAIL_ADDRESS": 3, "CREDIT_CARD": 1}
    return ex


def retried_exchange() -> Exchange:
    ex = full_exchange()
    ex.upstream_attempts = 2
    return ex


KINDS = [full_exchange, retried_exchange, refused_exchange, plain_exchange, exchange]
"""The kinds of exchange a request event is checked on (plus a hostile one per test)."""


@pytest.mark.parametrize("build", [*KINDS, lambda: hostile_exchange(leaks(7))])
def test_a_request_event_is_written_as_with_sorted_keys(build):
    sink = ListSink()
    writer = AuditWriter([sink], clock=lambda: NOW)
    context = EventContext(names(NOW + timedelta(days=1)), {"fake": "openai"})
    event = build_request_event(build(), context, NOW)
    writer.write_request(event)
    writer.write(event, scrubbed=True)
    ordered, sorted_ = sink.lines
    record = orjson.loads(ordered)
    assert ordered.encode() == orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    assert record["gateway.audit.seq"] == 1 and record["process.pid"] == os.getpid()
    assert record["gateway.audit.prev_hash"] == GENESIS
    assert record["gateway.audit.stream"] == writer.stream
    chain = {"gateway.audit.seq", "gateway.audit.prev_hash"}
    assert {k: v for k, v in record.items() if k not in chain} == {
        k: v for k, v in orjson.loads(sorted_).items() if k not in chain
    }


# --- buffered sinks ------------------------------------------------------------------------------


class CountingSink(ListSink):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


async def test_events_of_one_loop_iteration_are_flushed_together_right_after_it():
    sink = CountingSink()
    writer = AuditWriter([sink])
    write_events(writer, 5)
    assert sink.flushes == 0
    await asyncio.sleep(0)
    assert sink.flushes == 1
    write_events(writer, 1)
    await asyncio.sleep(0)
    assert sink.flushes == 2 and len(sink.lines) == 6


async def test_the_file_sink_writes_at_the_end_of_the_iteration_and_on_close(tmp_path):
    path = tmp_path / "audit.log"
    sink = RotatingFileSink(path, 10**9, 2)
    writer = AuditWriter([sink])
    write_events(writer, 3)
    assert lines_of(path) == []
    await asyncio.sleep(0)
    assert len(lines_of(path)) == 3
    write_events(writer, 4)
    audit.close_writer(writer)
    assert len(lines_of(path)) == 7
    assert verify(read_lines([path])).intact


async def test_buffered_lines_still_rotate_within_the_size_limit(tmp_path):
    path = tmp_path / "audit.log"
    writer = AuditWriter([RotatingFileSink(path, 4096, 5)])
    write_events(writer, 40)
    writer.close()
    rotated = sorted(tmp_path.glob("audit.log.*"), key=lambda p: -int(p.suffix[1:]))
    assert rotated and all(p.stat().st_size <= 4096 for p in [*rotated, path])
    verdict = verify(read_lines([*rotated, path]))
    assert verdict.intact and verdict.events == 40


async def test_the_stdout_sink_writes_an_iterations_events_in_one_write():
    buffer = io.StringIO()
    writes: list[str] = []
    original = buffer.write

    def record(text: str) -> int:
        writes.append(text)
        return original(text)

    buffer.write = record  # type: ignore[method-assign]
    configure_logging("info", "json", stream=buffer)
    try:
        writer = AuditWriter([StdoutSink()])
        write_events(writer, 3)
        await asyncio.sleep(0)
    finally:
        configure_logging("info", "json")
    assert len(writes) == 1
    assert [json.loads(line)["n"] for line in buffer.getvalue().splitlines()] == [0, 1, 2]


class FailingSink(ListSink):
    name = "failing"

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


async def test_a_failed_flush_counts_every_event_it_held():
    before = REGISTRY.get_sample_value("gateway_audit_write_errors_total", {"sink": "failing"})
    writer = AuditWriter([FailingSink()])
    write_events(writer, 3)
    await asyncio.sleep(0)
    after = REGISTRY.get_sample_value("gateway_audit_write_errors_total", {"sink": "failing"})
    assert (after or 0) - (before or 0) == 3


# --- remembered shapes ---------------------------------------------------------------------------


def later(ex: Exchange, seconds: float) -> Exchange:
    """`ex` again as another request of its shape: new id, times and token counts."""
    ex.request_id = f"req_{seconds:032.0f}"
    ex.timings.started += seconds
    for name in ("upstream_sent", "first_chunk", "first_written", "upstream_done", "finished"):
        if getattr(ex.timings, name):
            setattr(ex.timings, name, getattr(ex.timings, name) + seconds * 1.5)
    if ex.usage is not None:
        ex.usage = Usage(ex.usage.prompt_tokens + 1, ex.usage.completion_tokens + 7)
    return ex


@pytest.mark.parametrize("build", [*KINDS, lambda: hostile_exchange(leaks(8))])
def test_a_remembered_shape_gives_the_bytes_a_fresh_build_gives(build):
    context, shapes = EventContext(names(NOW + timedelta(days=1)), {"fake": "openai"}), {}
    ex = build()
    build_request_event(ex, context, NOW, shapes=shapes)
    again = later(ex, 3.25)
    remembered = build_request_event(again, context, NOW + timedelta(seconds=3), shapes=shapes)
    fresh = build_request_event(again, context, NOW + timedelta(seconds=3))
    assert orjson.dumps(remembered) == orjson.dumps(fresh)


def test_a_refused_credential_is_never_remembered():
    shapes: dict = {}
    build_request_event(refused_exchange(), EventContext(names(), {}), NOW, shapes=shapes)
    assert shapes == {}


def test_a_shape_with_a_text_to_scrub_is_not_remembered():
    shapes: dict = {}
    build_request_event(hostile_exchange(leaks(9)), EventContext(names(), {}), NOW, shapes=shapes)
    assert shapes == {}
