"""The SOC report: what the audit log says about identities, policies, anomalies and logins.

Owns reading audit events back, the report's figures and its Markdown, JSON and self-contained
HTML (inline SVG charts, no scripts, no network) forms. Must not print anything the log does
not hold: pseudonyms stay pseudonyms.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import orjson

TOP = 10
_DATASETS = ("gateway.audit", "gateway.security")


@dataclass(slots=True)
class Report:
    since: str | None = None
    first: str | None = None
    last: str | None = None
    requests: int = 0
    failures: int = 0
    tokens: int = 0
    top_tokens: list[dict[str, Any]] = field(default_factory=list)
    top_violations: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    auth_failures: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_events(lines: Iterable[str], since: datetime | None = None) -> list[dict[str, Any]]:
    """The audit and security events among `lines` (other log lines are skipped)."""
    events = []
    for line in lines:
        if '"event.dataset"' not in line:
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict) or not str(event.get("event.dataset")).startswith(
            "gateway."
        ):
            continue
        if since is not None and _when(event) < since:
            continue
        events.append(event)
    return sorted(events, key=lambda e: str(e.get("@timestamp", "")))


def _when(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event.get("@timestamp", "1970-01-01T00:00:00Z")))


def build_report(events: list[dict[str, Any]], since: datetime | None = None) -> Report:
    requests = [e for e in events if e.get("event.dataset") == "gateway.audit"]
    security = [e for e in events if e.get("event.dataset") == "gateway.security"]
    report = Report(since=since.isoformat() if since else None)
    if events:
        report.first, report.last = events[0].get("@timestamp"), events[-1].get("@timestamp")
    report.requests = len(requests)
    report.failures = sum(1 for e in requests if e.get("event.outcome") == "failure")
    report.tokens = sum(_tokens(e) for e in requests)
    report.top_tokens = _top_tokens(requests)
    report.top_violations = _top_violations(requests)
    report.decisions = _decisions(requests)
    report.anomalies = [_anomaly(e) for e in security if e.get("event.action") == "anomaly"]
    report.auth_failures = _auth_failures(requests, security)
    return report


def _tokens(event: dict[str, Any]) -> int:
    return int(event.get("gen_ai.usage.input_tokens", 0)) + int(
        event.get("gen_ai.usage.output_tokens", 0)
    )


def _top_tokens(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tokens: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    tenants: dict[str, str] = {}
    for event in requests:
        user = event.get("user.id")
        if user:
            tokens[user] += _tokens(event)
            counts[user] += 1
            tenants[user] = event.get("organization.id", "")
    return [{"user": u, "tenant": tenants[u], "tokens": t, "requests": counts[u]}
            for u, t in tokens.most_common(TOP)]  # fmt: skip


def _violations(event: dict[str, Any]) -> list[dict[str, Any]]:
    decisions = event.get("gateway.policy.decisions") or []
    return [d for d in decisions if isinstance(d, dict) and d.get("action") != "allow"]


def _top_violations(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts: Counter[str] = Counter()
    for event in requests:
        found = len(_violations(event))
        if found and event.get("user.id"):
            counts[event["user.id"]] += found
    return [{"user": u, "violations": n} for u, n in counts.most_common(TOP)]


def _decisions(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for event in requests:
        for d in event.get("gateway.policy.decisions") or []:
            key = (str(d.get("policy.id")), str(d.get("rule.id")), str(d.get("action")),
                   str(d.get("mode")))  # fmt: skip
            counts[key] += 1
    return [{"policy": p, "rule": r, "action": a, "mode": m, "count": n}
            for (p, r, a, m), n in counts.most_common()]  # fmt: skip


def _anomaly(event: dict[str, Any]) -> dict[str, Any]:
    kind = str(event.get("gateway.anomaly.identity_kind", ""))
    field_of = {"principal": "user.id", "tenant": "organization.id", "address": "source.address",
                "credential": "gateway.credential.fingerprint"}  # fmt: skip
    return {
        "time": event.get("@timestamp"),
        "detector": event.get("gateway.anomaly.detector"),
        "kind": kind,
        "identity": event.get(field_of.get(kind, ""), ""),
        "severity": event.get("event.severity_name"),
        "observed": event.get("gateway.anomaly.observed"),
        "baseline": event.get("gateway.anomaly.baseline"),
        "score": event.get("gateway.anomaly.score"),
    }


def _auth_failures(
    requests: list[dict[str, Any]], security: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    counts: Counter[str] = Counter()
    for event in requests:
        if event.get("http.response.status_code") == 401:
            counts[str(event.get("source.address", "unknown"))] += 1
    for event in security:
        if (
            event.get("event.category") == ["authentication"]
            and event.get("event.outcome") == "failure"
            and not event.get("http.request.id")
        ):
            counts[str(event.get("source.address", "unknown"))] += 1
    return [{"address": a, "failures": n} for a, n in counts.most_common(TOP)]


def render_json(report: Report) -> str:
    return orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode()


def render_markdown(report: Report) -> str:
    out = [
        "# Gateway SOC report",
        "",
        f"Period: {report.first or '-'} to {report.last or '-'}"
        + (f" (since {report.since})" if report.since else ""),
        f"Requests: {report.requests}, failed: {report.failures}, tokens: {report.tokens}",
    ]
    sections = (
        ("Top identities by tokens", report.top_tokens, ("user", "tenant", "tokens", "requests")),
        ("Top identities by violations", report.top_violations, ("user", "violations")),
        ("Decisions by policy and rule", report.decisions,
         ("policy", "rule", "action", "mode", "count")),
        ("Anomalies", report.anomalies,
         ("time", "detector", "kind", "identity", "severity", "observed", "baseline", "score")),
        ("Authentication failures by address", report.auth_failures, ("address", "failures")),
    )  # fmt: skip
    for title, rows, columns in sections:
        out += ["", f"## {title}", ""]
        if not rows:
            out.append("None.")
            continue
        out.append("| " + " | ".join(columns) + " |")
        out.append("|" + "---|" * len(columns))
        out += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out) + "\n"


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS and SVG, no scripts, nothing fetched."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">",
        "<title>Gateway SOC report</title><style>",
        _CSS,
        "</style></head><body>",
        "<h1>Gateway SOC report</h1>",
        f"<p>Period: {e(str(report.first or '-'))} to {e(str(report.last or '-'))}. "
        f"Requests: <b>{report.requests}</b>, failed: <b>{report.failures}</b>, "
        f"tokens: <b>{report.tokens}</b>.</p>",
        "<h2>Top identities by tokens</h2>",
        bar_chart([(r["user"], r["tokens"]) for r in report.top_tokens], "tokens"),
        "<h2>Top identities by violations</h2>",
        bar_chart([(r["user"], r["violations"]) for r in report.top_violations], "violations"),
        "<h2>Decisions by policy and rule</h2>",
        _table(report.decisions, ("policy", "rule", "action", "mode", "count")),
        "<h2>Anomalies</h2>",
        timeline(report.anomalies),
        _table(
            report.anomalies,
            ("time", "detector", "kind", "identity", "severity", "observed", "baseline", "score"),
        ),  # fmt: skip
        "<h2>Authentication failures by address</h2>",
        bar_chart([(r["address"], r["failures"]) for r in report.auth_failures], "failures"),
        "</body></html>",
    ]
    return "\n".join(parts)


_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}svg text{font-size:12px}
.none{color:#888}"""
_SEVERITY_COLOURS = {
    "critical": "#8b0000",
    "high": "#d62728",
    "medium": "#ff7f0e",
    "low": "#1f77b4",
}


def bar_chart(rows: list[tuple[str, int]], unit: str) -> str:
    """Horizontal bars, labelled, as inline SVG."""
    if not rows:
        return "<p class='none'>None.</p>"
    top = max(value for _, value in rows) or 1
    height = 22 * len(rows) + 10
    bars = []
    for index, (label, value) in enumerate(rows):
        y = 5 + 22 * index
        width = max(1, int(400 * value / top))
        bars.append(
            f"<text x='0' y='{y + 14}'>{html.escape(str(label))}</text>"
            f"<rect x='260' y='{y}' width='{width}' height='18' fill='#4c78a8'/>"
            f"<text x='{265 + width}' y='{y + 14}'>{value} {unit}</text>"
        )
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='800' height='{height}' "
            f"role='img'>{''.join(bars)}</svg>")  # fmt: skip


def timeline(anomalies: list[dict[str, Any]]) -> str:
    """Anomalies as dots on a time axis, one row per detector, coloured by severity."""
    if not anomalies:
        return "<p class='none'>None.</p>"
    times = [_when({"@timestamp": a["time"]}).timestamp() for a in anomalies]
    start, span = min(times), (max(times) - min(times)) or 1.0
    detectors = sorted({str(a["detector"]) for a in anomalies})
    rows = {d: i for i, d in enumerate(detectors)}
    height = 24 * len(detectors) + 40
    parts = [f"<text x='0' y='{24 * i + 20}'>{html.escape(d)}</text>" for d, i in rows.items()]
    for moment, anomaly in zip(times, anomalies, strict=True):
        x = 230 + int(540 * (moment - start) / span)
        y = 24 * rows[str(anomaly["detector"])] + 15
        colour = _SEVERITY_COLOURS.get(str(anomaly["severity"]), "#555")
        label = html.escape(f"{anomaly['time']} {anomaly['identity']}")
        parts.append(f"<circle cx='{x}' cy='{y}' r='6' fill='{colour}'><title>{label}</title>"
                     "</circle>")  # fmt: skip
    axis = height - 15
    parts.append(f"<line x1='230' y1='{axis}' x2='770' y2='{axis}' stroke='#888'/>")
    parts.append(f"<text x='230' y='{axis + 13}'>{html.escape(str(anomalies[0]['time']))}</text>")
    parts.append(f"<text x='600' y='{axis + 13}'>{html.escape(str(anomalies[-1]['time']))}</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='800' height='{height + 5}' "
            f"role='img'>{''.join(parts)}</svg>")  # fmt: skip


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    if not rows:
        return "<p class='none'>None.</p>"
    head = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
