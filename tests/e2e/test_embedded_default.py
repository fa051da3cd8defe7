"""The README's first command: `gateway serve` with no config, as a newcomer runs it.

Starts a real process on the embedded default (demo provider, no Redis, every control on),
makes a key with the one documented command, and checks that a prompt with personal data is
answered with the caller's values while the audit log holds counts, never the values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from faker import Faker

from tests.conftest import free_port
from tests.e2e.processes import GatewayProcess, wait_healthy

REPO = Path(__file__).resolve().parents[2]


def default_env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "GATEWAY_"))}
    env["GATEWAY_SERVER__PORT"] = str(port)
    env["GATEWAY_POLICIES__DIRECTORY"] = str(REPO / "policies")
    return env


@pytest.fixture
async def default_gateway(tmp_path):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", cwd=tmp_path, env=default_env(port),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    running = GatewayProcess(process, port)
    running.reader = asyncio.create_task(running._read_logs())
    try:
        await running.wait_for_event("gateway_started", within=120)
        await wait_healthy(running.url)
        yield running
    finally:
        # SIGTERM first: the redaction worker processes share stdout and must stop with it.
        if running.process.returncode is None:
            running.signal()
            with contextlib.suppress(TimeoutError):
                await running.wait_exit(within=30)
        await running.close()


async def test_embedded_default_redacts_and_restores_with_a_one_command_key(
    default_gateway, tmp_path
):
    made = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "keys", "create", "--name", "demo"],
        cwd=tmp_path, env=default_env(default_gateway.port), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    fake = Faker()
    Faker.seed(20261129)
    email = fake.email()
    prompt = f"Please write to {email} about the invoice."

    anonymous = default_gateway.client()
    with pytest.raises(openai.AuthenticationError):
        await anonymous.models.list()

    client = openai.AsyncOpenAI(base_url=default_gateway.url + "/v1", api_key=key, timeout=60)
    default_gateway.clients.append(client)
    reply = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
    )
    assert reply.choices[0].message.content == prompt  # echoed, with the value restored

    for _ in range(100):
        served = [e for e in default_gateway.events if e.get("http.response.status_code") == 200]
        if served:
            break
        await asyncio.sleep(0.05)
    logged = "\n".join(json.dumps(e) for e in default_gateway.events)
    assert email not in logged and key not in logged
    assert len(served) == 1 and "EMAIL_ADDRESS" in json.dumps(served[0])
