"""The SOC report and the `gateway soc` / `gateway audit` commands on a generated audit log."""

from __future__ import annotations

import json
import random
import string
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.anomaly import Anomaly
from gateway.audit import AuditWriter, RotatingFileSink
from gateway.audit_event import EventContext
from gateway.audit_privacy import Pseudonymizer
from gateway.exchange import Exchange, PolicyDecision, Principal, Route, Usage
from gateway.soc_report import build_report, parse_events, render_html, render_markdown
from gateway.stages.audit_log import AuditTrail

START = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
KEY = "".join(random.Random(5).choices(string.ascii_letters, k=40))
NAMES = Pseudonymizer([("k1", KEY.encode())])
# subject, tenant, requests, tokens per request, blocked requests
USERS = [("alice", "acme", 10, 100, 0), ("bob", "acme", 5, 1000, 1), ("carol", "globex", 8, 10, 4)]


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=30)
        return self.now


def request(subject: str, tenant: str, tokens: int, blocked: bool) -> Exchange:
    ex = Exchange("req_" + subject, "chat.completions", "POST", "/v1/chat/completions", {},
                  "198.51.100.7")  # fmt: skip
    ex.model, ex.route = "gpt-4o-mini", Route("gpt-4o-mini", "fake", "gpt-4o-mini")
    ex.principal = Principal(subject, tenant=tenant, method="api_key")
    ex.status = 400 if blocked else 200
    if blocked:
        ex.decisions = [PolicyDecision("injection", "1", "override", "block", "high", "enforce",
                                       "request", "f00d")]  # fmt: skip
    else:
        ex.usage = Usage(tokens // 2, tokens - tokens // 2)
    return ex


def write_log(path: Path) -> None:
    clock = Clock()
    writer = AuditWriter([RotatingFileSink(path, 10**8, 2)], clock=clock)
    trail = AuditTrail(writer, EventContext(NAMES, {"fake": "openai"}))
    for subject, tenant, count, tokens, blocked in USERS:
        for index in range(count):
            trail.record(request(subject, tenant, tokens, index < blocked))
    for _ in range(3):
        failed = Exchange("req_x", "chat.completions", "POST", "/v1/chat/completions", {},
                          "203.0.113.9")  # fmt: skip
        failed.status = 401
        trail.record(failed)
    at = (START + timedelta(hours=1)).timestamp()
    trail.report_anomaly(Anomaly("tokens_per_minute", "principal", NAMES.user("bob"), 5000,
                                 500, 9.5, "medium", at))  # fmt: skip
    trail.report_anomaly(Anomaly("auth_failure_burst_address", "address", "203.0.113.0/24", 12,
                                 10, 0, "high", at + 60))  # fmt: skip
    writer.close()


@pytest.fixture
def log_file(tmp_path) -> Path:
    path = tmp_path / "audit.log"
    write_log(path)
    return path


def test_the_report_ranks_identities_and_lists_anomalies(log_file):
    report = build_report(parse_events(log_file.read_text().splitlines()))
    assert report.requests == 26 and report.failures == 8
    assert [(r["user"], r["tokens"]) for r in report.top_tokens] == [
        (NAMES.user("bob"), 4000),
        (NAMES.user("alice"), 1000),
        (NAMES.user("carol"), 40),
    ]
    assert report.top_tokens[0]["tenant"] == NAMES.tenant("acme")
    assert [(r["user"], r["violations"]) for r in report.top_violations] == [
        (NAMES.user("carol"), 4),
        (NAMES.user("bob"), 1),
    ]
    assert report.decisions == [
        {"policy": "injection", "rule": "override", "action": "block", "mode": "enforce",
         "count": 5}
    ]  # fmt: skip
    assert [(a["detector"], a["identity"]) for a in report.anomalies] == [
        ("tokens_per_minute", NAMES.user("bob")),
        ("auth_failure_burst_address", "203.0.113.0/24"),
    ]
    assert report.auth_failures == [{"address": "203.0.113.0/24", "failures": 3}]


def test_since_leaves_out_older_events(log_file):
    since = START + timedelta(minutes=59)
    report = build_report(parse_events(log_file.read_text().splitlines(), since), since)
    assert report.requests == 0 and len(report.anomalies) == 2


def test_markdown_and_html_name_the_same_identities(log_file):
    report = build_report(parse_events(log_file.read_text().splitlines()))
    markdown, page = render_markdown(report), render_html(report)
    for text in (markdown, page):
        assert NAMES.user("bob") in text and "auth_failure_burst_address" in text
    assert "## Top identities by tokens" in markdown
    assert (
        page.count("<svg") == 4
        and "<script" not in page
        and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    )


def test_the_report_command_writes_each_format(log_file, capsys):
    assert main(["soc", "report", str(log_file), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["top_tokens"][0]["user"] == NAMES.user("bob")
    assert main(["soc", "report", str(log_file), "--since", "1d"]) == 0
    assert "# Gateway SOC report" in capsys.readouterr().out


def test_the_pseudonym_command_finds_the_subject_in_the_log(
    log_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("AUDIT_KEY_FOR_TEST", KEY)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "providers: {fake: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "models: [{name: gpt-4o-mini, provider: fake}]\n"
        "audit: {pseudonym_keys: [{id: k1, key: '${AUDIT_KEY_FOR_TEST}'}]}\n"
    )
    assert main(["soc", "pseudonym", "bob", "--config", str(config)]) == 0
    pseudonym, key_id = capsys.readouterr().out.split()
    assert key_id == "key_id=k1" and f'"user.id":"{pseudonym}"' in log_file.read_text()
    assert main(["soc", "pseudonym", "acme", "--tenant", "--config", str(config)]) == 0
    assert capsys.readouterr().out.split()[0] == NAMES.tenant("acme")


def test_the_verify_command_accepts_an_intact_log_and_pinpoints_damage(log_file, capsys):
    assert main(["audit", "verify", str(log_file)]) == 0
    assert "28 events in 1 stream(s): intact" in capsys.readouterr().out
    lines = log_file.read_text().splitlines()
    lines[4] = lines[4].replace('status_code":200', 'status_code":201')
    del lines[10]
    lines[20], lines[21] = lines[21], lines[20]
    log_file.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(log_file)]) == 1
    out = capsys.readouterr().out
    assert f"{log_file}:5: edited" in out
    assert f"{log_file}:11: gap: seq 11 missing" in out
    assert f"{log_file}:22: reordered: seq 22 comes after seq 23 ({log_file}:21)" in out
    assert "27 events in 1 stream(s): 3 problem(s)" in out
