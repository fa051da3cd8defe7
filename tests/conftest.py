"""Shared fixtures: a fake provider, a private redis-server, and a gateway on a real port."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings
from gateway.log import configure_logging
from tests.fakes.upstream import FakeProvider

TEST_KEY = "test-client-key"
PROVIDER_KEY = "sk-provider-secret-for-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """Captures every JSON log line the gateway writes during the test."""
    buffer = io.StringIO()
    configure_logging("debug", "json", stream=buffer)
    yield buffer
    configure_logging("info", "json")


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    fake = await FakeProvider().start()
    yield fake
    await fake.stop()


def base_config(provider: FakeProvider, **sections: Any) -> dict[str, Any]:
    """A config dict routing `gpt-4o-mini` (and friends) to the fake provider."""
    config: dict[str, Any] = {
        "providers": {
            "fake": {"base_url": provider.url, "api_key": PROVIDER_KEY, "retries": {"attempts": 0}},
        },
        "models": [
            {"name": "gpt-4o-mini", "provider": "fake"},
            {"name": "fast", "provider": "fake", "upstream_model": "llama-3.1-8b"},
            {"name": "text-embedding-3-small", "provider": "fake"},
        ],
        "auth": {"mode": "disabled"},
    }
    config.update(sections)
    return config


@dataclass
class RunningGateway:
    app: web.Application
    runner: web.AppRunner
    port: int
    clients: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = TEST_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 10)
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, **kwargs)
        self.clients.append(client)
        return client

    def sync_client(self, api_key: str = TEST_KEY, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 10)
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, **kwargs)
        self.clients.append(client)
        return client

    async def close_clients(self) -> None:
        for client in self.clients:
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
            else:
                client.close()


StartGateway = Callable[[dict[str, Any]], Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """Starts the real app on a loopback port from a config dict; stops it after the test."""
    started: list[RunningGateway] = []

    async def start(config: dict[str, Any]) -> RunningGateway:
        settings = Settings.model_validate(config)
        app = create_app(settings)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started.append(RunningGateway(app, runner, port))
        return started[-1]

    yield start
    for running in started:
        await running.close_clients()
        await running.runner.cleanup()


@pytest.fixture
async def gateway(provider: FakeProvider, start_gateway: StartGateway) -> RunningGateway:
    """The gateway with the default test config in front of the fake provider."""
    return await start_gateway(base_config(provider))


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    directory: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    async def restart(self) -> None:
        self.stop()
        self.process = _spawn_redis(self.port, self.directory)
        await _wait_redis(self.port)


def _spawn_redis(port: int, directory: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def _wait_redis(port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"redis-server did not start on port {port}")


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A private, real redis-server on a free port (killable for fault tests)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; .ci/run installs it")
    directory = tempfile.mkdtemp(prefix="gateway-redis-")
    port = free_port()
    server = RedisServer(port, _spawn_redis(port, directory), directory)
    await _wait_redis(port)
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)
