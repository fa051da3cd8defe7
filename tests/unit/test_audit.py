"""The audit event, pseudonyms, the scrubber, the hash chain and its verification."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import string
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from faker import Faker

from gateway import audit
from gateway.audit import (
    GENESIS,
    AuditWriter,
    EventContext,
    Pseudonymizer,
    RotatingFileSink,
    build_request_event,
    emit_security_event,
    scrub,
    scrub_text,
    truncate_address,
    user_agent_family,
)
from gateway.audit_verify import read_lines, verify
from gateway.config import AuditSettings
from gateway.exchange import Exchange, PolicyDecision, Principal, Route, Usage
from gateway.log import configure_logging

NOW = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
RNG = random.Random(7)
KEY_A = "".join(RNG.choices(string.ascii_letters, k=40))
KEY_B = "".join(RNG.choices(string.ascii_letters, k=40))


def names(overlap: datetime | None = None) -> Pseudonymizer:
    return Pseudonymizer([("k2", KEY_A.encode()), ("k1", KEY_B.encode())], overlap)


def secret(prefix: str, length: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return prefix + "".join(RNG.choices(alphabet, k=length))


def fake_jwt() -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256'})}.{part({'sub': 'x' * 12})}.{secret('', 43)}"


class ListSink:
    name = "list"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def close(self) -> None:
        pass


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


def test_pseudonyms_are_stable_per_key_and_differ_between_keys():
    one, two = names(), Pseudonymizer([("k1", KEY_B.encode())])
    assert one.user("alice") == names().user("alice")
    assert one.user("alice") != two.user("alice")
    assert one.user("alice") != one.tenant("alice")
    assert one.user("alice").startswith("ps_") and "alice" not in one.user("alice")
    assert one.key_id == "k2"


def test_rotation_overlap_carries_the_older_pseudonyms_until_it_ends():
    overlapping = names(NOW + timedelta(days=1))
    older = Pseudonymizer([("k1", KEY_B.encode())]).user("alice")
    assert overlapping.older_users("alice", NOW) == [older]
    assert overlapping.older_users("alice", NOW + timedelta(days=2)) == []
    assert names().older_users("alice", NOW) == []


def test_without_configured_keys_a_random_ephemeral_key_is_used():
    first = Pseudonymizer.from_settings(AuditSettings())
    second = Pseudonymizer.from_settings(AuditSettings())
    assert first.key_id == "ephemeral"
    assert first.user("alice") != second.user("alice")


# --- addresses, agents, scrubber ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("2001:db8:abcd:12::1", "2001:db8:abcd::/48"),
        ("::ffff:198.51.100.9", "198.51.100.0/24"),
        ("fe80::1%eth0", "fe80::/48"),
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("", None),
        ("not-an-address", None),
    ],
)
def test_addresses_are_truncated_to_their_network(address, expected):
    assert truncate_address(address) == expected


@pytest.mark.parametrize(
    ("agent", "family"),
    [
        ("OpenAI/Python 1.50.0", "openai-python"),
        ("curl/8.1.2", "curl"),
        ("Mozilla/5.0 (X11) AppleWebKit Chrome/120.0 Safari/537.36", "chrome"),
        ("my-tool/1.0 (contact alice@example.org)", "other"),
        (None, None),
    ],
)
def test_user_agents_are_reduced_to_a_family(agent, family):
    assert user_agent_family(agent) == family


def generated_secrets() -> list[str]:
    fake = Faker()
    fake.seed_instance(11)
    return [
        fake.email(),
        secret("AKIA", 16, string.ascii_uppercase + string.digits),
        secret("ghp_", 36),
        secret("sk-", 48),
        secret("sk-proj-", 40),
        secret("xoxb-", 30, string.digits + "-"),
        fake_jwt(),
        secret("", 40, string.ascii_letters + string.digits + "/+"),
        "Bearer " + secret("", 20, string.ascii_lowercase),
        fake.ipv4_public(),
        fake.ipv6(),
        "-----BEGIN RSA "
        + "PRIVATE KEY-----\n"
        + secret("", 64)
        + "\n-----END RSA "
        + "PRIVATE KEY-----",
    ]


@pytest.mark.parametrize("value", generated_secrets())
def test_the_scrubber_removes_emails_keys_tokens_and_addresses(value):
    scrubbed = scrub_text(f"before {value} after")
    assert value not in scrubbed
    assert scrubbed.startswith("before ") and scrubbed.endswith(" after")


@pytest.mark.parametrize(
    "value",
    [
        "ps_0123456789abcdef01234567",
        "req_0123456789abcdef0123456789abcdef",
        GENESIS,
        "gpt-4o-mini",
        "chat.completions",
        "2024-05-01T09:30:00.000Z",
    ],
)
def test_the_scrubber_keeps_ids_hashes_and_names(value):
    assert scrub_text(value) == value


def test_scrub_walks_nested_values_and_trusts_only_its_own_fields():
    email = Faker().email()
    event = {"a": [email, {"b": email}], "source.address": "203.0.113.0/24", "n": 3}
    assert scrub(event) == {
        "a": ["[email]", {"b": "[email]"}],
        "source.address": "203.0.113.0/24",
        "n": 3,
    }


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
