"""Two gateway instances sharing a real Redis: keys made on one work on the other, and a
revocation on one (or from the CLI) is refused everywhere within `auth.keys.cache_seconds`."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
import yaml

from tests.conftest import base_config

RNG = random.Random(5)
HASH_KEY = "".join(RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(32))
BOUND_SECONDS = 2.0  # auth.keys.cache_seconds default: the documented revocation bound
MESSAGES = [{"role": "user", "content": "ping"}]


def replica_config(provider, redis_server, tmp_path) -> dict:
    auth = {"mode": "required", "keys": {"path": str(tmp_path / "unused.json"),
                                         "hash_key": HASH_KEY}}  # fmt: skip
    return base_config(provider, auth=auth, redis={"url": redis_server.url})


async def cli(tmp_path, config: dict, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "gateway", "keys", *args, "--config", str(path)]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


async def refused_within(client: openai.AsyncOpenAI, seconds: float) -> float:
    started = time.monotonic()
    while True:
        try:
            await client.models.list()
        except openai.AuthenticationError as error:
            assert "revoked" in error.message
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, "the revocation did not arrive in time"
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_key_made_on_one_replica_works_on_the_other_and_revocation_spreads(
    provider, redis_server, start_gateway, tmp_path, log_buffer
):
    config = replica_config(provider, redis_server, tmp_path)
    first, second = await start_gateway(config), await start_gateway(config)
    boss = await cli(tmp_path, config, "create", "--name", "ops", "--roles", "gateway-admin")
    admin_key = boss.stdout.strip()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_key}"}) as session:
        async with session.post(first.url + "/admin/keys", json={"name": "app"}) as response:
            assert response.status == 201
            created = await response.json()
        key = created["key"]
        other = second.client(key)
        reply = await other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert reply.choices[0].message.content == "ping"
        await other.models.list()  # now cached on the second replica
        async with session.delete(first.url + f"/admin/keys/{created['id']}") as response:
            assert response.status == 200
    await refused_within(other, BOUND_SECONDS)
    for received in provider.control.received:
        assert key not in str(dict(received.headers))
    logs = log_buffer.getvalue()
    assert key not in logs and admin_key not in logs


@pytest.mark.slow
async def test_cli_revocation_reaches_every_running_replica(
    provider, redis_server, start_gateway, tmp_path
):
    config = replica_config(provider, redis_server, tmp_path)
    first, second = await start_gateway(config), await start_gateway(config)
    made = await cli(tmp_path, config, "create", "--name", "batch", "--models", "gpt-4o*")
    key = made.stdout.strip()
    clients = [first.client(key), second.client(key)]
    for client in clients:
        assert [m.id async for m in client.models.list()] == ["gpt-4o-mini"]
    listed = await cli(tmp_path, config, "list", "--json")
    key_id = yaml.safe_load(listed.stdout.splitlines()[0])["id"]
    assert key not in listed.stdout
    await cli(tmp_path, config, "revoke", key_id)
    for client in clients:
        await refused_within(client, BOUND_SECONDS)
