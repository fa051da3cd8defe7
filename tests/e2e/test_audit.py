"""The audit trail end to end: one event per request, nothing personal or secret on any sink."""

from __future__ import annotations

import asyncio
import random
import signal
import string
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from faker import Faker
from prometheus_client import REGISTRY

from gateway import app as app_module
from gateway.audit_verify import verify
from gateway.errors import AuthenticationError, ContentPolicyError
from gateway.exchange import Exchange, PolicyDecision, Principal
from gateway.pipeline import Stage
from gateway.sse import SseEvent
from tests.conftest import PROVIDER_KEY, base_config
from tests.e2e.processes import demo_config, free_port, gateway_process

SEED = 20240501


def generated_secrets(rng: random.Random) -> list[str]:
    """Credential-shaped values, generated here so none is ever committed."""
    alnum = string.ascii_letters + string.digits

    def pick(alphabet: str, length: int) -> str:
        return "".join(rng.choices(alphabet, k=length))

    return [
        "AKIA" + pick(string.ascii_uppercase + string.digits, 16),
        "ghp_" + pick(alnum, 36),
        "sk-" + pick(alnum, 48),
        "xoxb-" + pick(string.digits, 12) + "-" + pick(alnum, 24),
        "eyJ" + pick(alnum, 30) + ".eyJ" + pick(alnum, 40) + "." + pick(alnum + "-_", 43),
        pick(alnum + "/+", 40),
    ]


class Seeded:
    """Personal data and secrets for one test run, from a fixed seed."""

    def __init__(self) -> None:
        fake = Faker()
        fake.seed_instance(SEED)
        rng = random.Random(SEED)
        self.people = [
            {"name": fake.name(), "email": fake.email(), "phone": fake.phone_number(),
             "address": fake.street_address(), "iban": fake.iban(), "ssn": fake.ssn(),
             "card": fake.credit_card_number(), "ip": fake.ipv4_public()}
            for _ in range(4)
        ]  # fmt: skip
        self.secrets = generated_secrets(rng)
        self.keys = {"cl-" + "".join(rng.choices(string.ascii_letters, k=40)): person["email"]
                     for person in self.people}  # fmt: skip
        self.tenant = fake.company()

    def prompt(self, index: int) -> str:
        person = self.people[index % len(self.people)]
        secret = self.secrets[index % len(self.secrets)]
        return (f"Write to {person['name']} at {person['email']} or {person['phone']}, "
                f"{person['address']}; IBAN {person['iban']}, SSN {person['ssn']}, card "
                f"{person['card']}, host {person['ip']}, token {secret}.")  # fmt: skip

    def values(self) -> list[str]:
        found = [v for p in self.people for v in p.values()]
        found += self.secrets + list(self.keys) + [self.tenant, PROVIDER_KEY]
        return [v for v in found if len(v) >= 6]


class FakeGuard(Stage):
    """Stands in for the real auth and policy stages: sets a principal from the API key,
    refuses unknown keys, blocks prompts marked BLOCK and cuts completions marked CUT."""

    name = "fake_guard"

    def __init__(self, keys: dict[str, str], tenant: str) -> None:
        self.keys, self.tenant = keys, tenant

    async def on_request(self, exchange: Exchange) -> None:
        key = exchange.headers.get("authorization", "").removeprefix("Bearer ")
        if key not in self.keys:
            raise AuthenticationError("Incorrect API key provided.")
        exchange.principal = Principal(self.keys[key], tenant=self.tenant, key_id="key_demo",
                                       method="api_key")  # fmt: skip
        exchange.redaction_counts = {"EMAIL_ADDRESS": 1, "PERSON": 1}
        if "BLOCK" in exchange.raw_body.decode():
            exchange.decisions.append(_decision("prompt_injection", "override", "request"))
            raise ContentPolicyError("The prompt was blocked by rule override.")

    async def on_response(self, exchange: Exchange, completion: dict[str, Any]) -> dict[str, Any]:
        if "CUT" in orjson.dumps(completion).decode():
            exchange.decisions.append(_decision("output_safety", "cut", "response"))
            raise ContentPolicyError("The completion was blocked by rule cut.")
        return completion

    def on_stream(
        self, exchange: Exchange, events: AsyncIterator[SseEvent]
    ) -> AsyncIterator[SseEvent]:
        return self._cut(exchange, events)

    async def _cut(
        self, exchange: Exchange, events: AsyncIterator[SseEvent]
    ) -> AsyncIterator[SseEvent]:
        async for event in events:
            if "CUT" in event.data:
                exchange.decisions.append(_decision("output_safety", "cut", "response"))
                raise ContentPolicyError("The completion was blocked by rule cut.")
            yield event


def _decision(policy: str, rule: str, direction: str) -> PolicyDecision:
    return PolicyDecision(policy, "1", rule, "block", "high", "enforce", direction, "f00d")


@pytest.fixture
def seeded() -> Seeded:
    return Seeded()


@pytest.fixture
def guarded(monkeypatch, seeded):
    original = app_module.build_stages

    def build(settings, **engines):
        return [*original(settings, **engines), FakeGuard(seeded.keys, seeded.tenant)]

    monkeypatch.setattr(app_module, "build_stages", build)


def audit_config(provider, tmp_path, **audit: Any) -> dict[str, Any]:
    rng = random.Random(SEED + 1)
    key = "".join(rng.choices(string.ascii_letters, k=40))
    settings = {"sinks": ["stdout", "file"], "file_path": str(tmp_path / "audit.log"),
                "file_max_bytes": 8192, "pseudonym_keys": [{"id": "k1", "key": key}]}  # fmt: skip
    settings.update(audit)
    return base_config(provider, audit=settings)


def audit_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if '"gateway.audit.seq"' in line:
            events.append(orjson.loads(line))
    return events


def file_sink_text(tmp_path) -> str:
    files = sorted(tmp_path.glob("audit.log*"), key=lambda p: -int(p.suffix[1:] or 0)
                   if p.suffix[1:].isdigit() else 0)  # fmt: skip
    return "".join(p.read_text() for p in files)


async def drive_traffic(gw, provider, seeded: Seeded) -> int:
    """Allowed, blocked and refused requests, streamed or not; returns how many were sent."""
    keys = list(seeded.keys)
    sent = 0
    for index in range(4):
        client = gw.client(api_key=keys[index])
        prompt = seeded.prompt(index)
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )
        provider.reply(prompt, chunks=[prompt[:17], prompt[17:40], prompt[40:]])
        stream = await client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": prompt}], stream=True
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "BLOCK " + prompt}]
            )
        provider.reply(prompt + " CUT")
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
            )
        provider.reply(prompt + " CUT", chunks=[prompt, " CUT"])
        with pytest.raises(openai.APIError):
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
            )
            async for _ in stream:
                pass
        with pytest.raises(openai.AuthenticationError):
            await gw.client(api_key=seeded.secrets[index]).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
            )
        sent += 6
    return sent


async def test_no_sink_and_no_metric_holds_personal_data_keys_or_tokens(
    provider, start_gateway, log_buffer, tmp_path, seeded, guarded
):
    gw = await start_gateway(audit_config(provider, tmp_path))
    sent = await drive_traffic(gw, provider, seeded)
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as response:
            metrics_text = await response.text()
        bad_json = {"Authorization": f"Bearer {seeded.secrets[0]}", "x-request-id": "bad-json-1"}
        async with session.post(
            gw.url + "/v1/chat/completions", data=seeded.prompt(1).encode(), headers=bad_json
        ) as response:
            assert response.status == 400
    await gw.app[app_module.AUDIT_TRAIL].detector.drain()
    stdout_text, file_text = log_buffer.getvalue(), file_sink_text(tmp_path)
    assert len(audit_events(stdout_text)) >= sent + 1
    assert audit_events(file_text) == [e for e in audit_events(stdout_text)]
    leaks = [
        (value, where)
        for where, text in (("stdout", stdout_text), ("file", file_text), ("metrics", metrics_text))
        for value in seeded.values()
        if value in text
    ]
    assert leaks == []
    users = {e.get("user.id") for e in audit_events(file_text)} - {None}
    assert len(users) == 4 and all(u.startswith("ps_") for u in users)


async def test_every_request_has_exactly_one_event_also_when_refused_early(
    provider, start_gateway, log_buffer, tmp_path
):
    config = audit_config(provider, tmp_path, sinks=["file"])
    config["server"] = {"max_body_bytes": 4096}
    gw = await start_gateway(config)
    client = gw.client()
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}],
        extra_headers={"x-request-id": "ok-1"},
    )  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hello"}],
            extra_headers={"x-request-id": "unknown-model-1"},
        )  # fmt: skip
    cases = [("bad-json-1", "/v1/chat/completions", b"{not json", 400),
             ("not-found-1", "/v1/nothing/here", b"{}", 404),
             ("too-large-1", "/v1/chat/completions", b"x" * 10_000, 413)]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for request_id, path, body, status in cases:
            headers = {"x-request-id": request_id, "Content-Type": "application/json"}
            async with session.post(gw.url + path, data=body, headers=headers) as response:
                assert response.status == status
    events = audit_events(file_sink_text(tmp_path))
    by_id = {e["http.request.id"]: e for e in events}
    assert len(events) == len(by_id) == 5
    assert by_id["ok-1"]["http.response.status_code"] == 200
    assert by_id["ok-1"]["gen_ai.request.model"] == "gpt-4o-mini"
    assert by_id["ok-1"]["gen_ai.system"] == "openai"
    assert by_id["ok-1"]["source.address"] == "127.0.0.0/24"
    assert by_id["ok-1"]["user_agent.name"] == "openai-python"
    assert by_id["unknown-model-1"]["error.code"] == "model_not_found"
    assert by_id["bad-json-1"]["error.code"] == "invalid_json"
    assert by_id["not-found-1"]["http.response.status_code"] == 404
    assert by_id["too-large-1"]["error.code"] == "request_too_large"
    assert verify(
        (str(i), line) for i, line in enumerate(file_sink_text(tmp_path).splitlines())
    ).intact
    assert '"gateway.audit.seq"' not in log_buffer.getvalue(), "stdout is not a configured sink"


async def test_an_auth_failure_burst_raises_an_anomaly_event_and_metric(
    provider, start_gateway, log_buffer, tmp_path, seeded, guarded
):
    gw = await start_gateway(audit_config(provider, tmp_path, anomaly={"auth_failures": 5}))
    for secret in seeded.secrets:
        with pytest.raises(openai.AuthenticationError):
            await gw.client(api_key=secret).models.list()
    await gw.app[app_module.AUDIT_TRAIL].detector.drain()
    alerts = [e for e in audit_events(log_buffer.getvalue()) if e["event.action"] == "anomaly"]
    found = [(a["gateway.anomaly.detector"], a["source.address"], a["event.kind"]) for a in alerts]
    assert found == [("auth_failure_burst_address", "127.0.0.0/24", "alert")]
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert 'gateway_anomalies_total{detector="auth_failure_burst_address",severity="high"}' in text


async def test_with_redis_a_concurrent_burst_is_analysed_in_full_and_raised_once(
    provider, start_gateway, log_buffer, tmp_path, seeded, guarded, redis_server
):
    config = audit_config(provider, tmp_path, anomaly={"auth_failures": 5})
    gw = await start_gateway({**config, "redis": {"url": redis_server.url}})
    errors = REGISTRY.get_sample_value("gateway_anomaly_errors_total") or 0
    dropped = REGISTRY.get_sample_value("gateway_anomaly_dropped_total") or 0

    async def refused(secret: str) -> None:
        with pytest.raises(openai.AuthenticationError):
            await gw.client(api_key=secret).models.list()

    attempts = seeded.secrets * 6
    await asyncio.gather(*(refused(secret) for secret in attempts))
    await gw.app[app_module.AUDIT_TRAIL].detector.drain()
    alerts = [e for e in audit_events(log_buffer.getvalue()) if e["event.action"] == "anomaly"]
    by_address = [a["source.address"] for a in alerts if "source.address" in a]
    by_key = [a["gateway.credential.fingerprint"] for a in alerts if "source.address" not in a]
    assert by_address == ["127.0.0.0/24"], "one burst from one network, raised once"
    assert len(by_key) == len(set(by_key)) == len(seeded.secrets), "each key's burst, once"
    assert {a["gateway.anomaly.detector"] for a in alerts} == {
        "auth_failure_burst_address", "auth_failure_burst_credential"
    }  # fmt: skip
    assert REGISTRY.get_sample_value("gateway_anomaly_errors_total") == errors
    assert REGISTRY.get_sample_value("gateway_anomaly_dropped_total") == dropped
    client = aioredis.Redis.from_url(redis_server.url)
    window = "{gateway:anomaly}:w:auth_failure_burst_address:127.0.0.0/24"
    assert await client.zcard(window) == len(attempts), "every refused login was analysed"
    await client.aclose()


@pytest.mark.slow
async def test_a_graceful_shutdown_writes_every_buffered_event(tmp_path):
    config = demo_config(free_port(), drain_delay=0.1, shutdown_timeout=10)
    config["audit"] = {"sinks": ["file"], "file_path": str(tmp_path / "audit.log")}
    async with gateway_process(config, tmp_path) as gateway:
        client = gateway.client()
        ids = [f"shutdown-{index}" for index in range(40)]
        await asyncio.gather(*(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}],
                extra_headers={"x-request-id": request_id},
            )
            for request_id in ids
        ))  # fmt: skip
        gateway.signal(signal.SIGTERM)
        assert await gateway.wait_exit(15) == 0
    text = file_sink_text(tmp_path)
    assert sorted(e["http.request.id"] for e in audit_events(text)) == sorted(ids)
    assert verify((str(i), line) for i, line in enumerate(text.splitlines())).intact
