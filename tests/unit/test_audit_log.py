"""`AuditTrail`: one event per finished request, and an observation for the detectors when they
can learn from it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.anomaly import AnomalyDetector, MemoryStore, Observation
from gateway.audit import AuditWriter
from gateway.audit_event import EventContext
from gateway.audit_privacy import Pseudonymizer
from gateway.config import AnomalySettings
from gateway.exchange import Exchange, PolicyDecision, Principal
from gateway.stages.audit_log import AuditTrail, teaches_detectors
from tests.fakes.sinks import ListSink

NOW = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)


def exchange(status: int, **fields) -> Exchange:
    ex = Exchange("req_1", "chat.completions", "POST", "/v1/chat/completions", {}, "203.0.113.7")
    ex.status = status
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


def canary() -> PolicyDecision:
    return PolicyDecision("canary", "1", "canary_echo", "block", "critical", "enforce",
                          "response", "f00d")  # fmt: skip


def trail_with_detector(monkeypatch) -> tuple[AuditTrail, ListSink, list[Observation]]:
    sink = ListSink()
    writer = AuditWriter([sink], clock=lambda: NOW)
    context = EventContext(Pseudonymizer([("k1", b"k" * 32)]), {})
    detector = AnomalyDetector(AnomalySettings(), MemoryStore(), lambda _: None)
    submitted: list[Observation] = []
    monkeypatch.setattr(detector, "submit", submitted.append)
    return AuditTrail(writer, context, detector), sink, submitted


@pytest.mark.parametrize(
    ("ex", "teaches"),
    [
        (exchange(200), False),
        (exchange(404), False),
        (exchange(200, principal=Principal("alice", tenant="acme")), True),
        (exchange(401), True),
        (exchange(200, decisions=[canary()]), True),
    ],
)
def test_only_requests_a_detector_can_learn_from_are_observed(monkeypatch, ex, teaches):
    trail, sink, submitted = trail_with_detector(monkeypatch)
    trail.record(ex)
    assert teaches_detectors(ex) is teaches
    assert len(sink.lines) == 1, "every request is audited, observed or not"
    assert len(submitted) == int(teaches)


async def test_a_request_no_detector_learns_from_raises_nothing_and_leaves_no_state():
    """What skipping the queue saves: the detectors would have done nothing with it."""
    store = MemoryStore()
    raised: list[object] = []
    detector = AnomalyDetector(AnomalySettings(), store, raised.append)
    trail = AuditTrail(AuditWriter([ListSink()], clock=lambda: NOW),
                       EventContext(Pseudonymizer([("k1", b"k" * 32)]), {}), detector)  # fmt: skip
    event = {"source.address": "203.0.113.0/24"}
    assert await detector.observe(trail.observation(exchange(200), event)) == []
    assert raised == [] and vars(store) == vars(MemoryStore())
