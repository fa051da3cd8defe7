"""Real `gateway serve` processes for the end-to-end tests of workers and shutdown.

Each process runs `sys.executable -m gateway serve --config <yaml>` and its JSON log lines are
collected so tests can wait for events (`gateway_started`, `gateway_draining`) and read pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_KEY, free_port


def demo_config(port: int, **server: Any) -> dict[str, Any]:
    """A config serving `gpt-4o-mini` from the in-process demo provider, auth disabled."""
    return {
        "server": {"host": "127.0.0.1", "port": port, **server},
        "auth": {"mode": "disabled"},
        "providers": {"demo": {"kind": "demo", "demo": {"mode": "echo", "chunk_chars": 4}}},
        "models": [{"name": "gpt-4o-mini", "provider": "demo"}],
    }


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    port: int
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)
    logged: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=TEST_KEY, **kwargs)
        self.clients.append(client)
        return client

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def wait_for_event(self, event: str, count: int = 1, within: float = 20) -> None:
        async with asyncio.timeout(within):
            while len(self.named(event)) < count:
                if self.reader is not None and self.reader.done():
                    raise AssertionError(f"gateway exited before logging {event} x{count}")
                self.logged.clear()
                await self.logged.wait()

    async def wait_exit(self, within: float) -> int:
        async with asyncio.timeout(within):
            return await self.process.wait()

    async def _read_logs(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
            self.logged.set()
        self.logged.set()

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self.reader is not None:
            await self.reader


async def start_process(config: dict[str, Any], directory: Path) -> GatewayProcess:
    """Starts `gateway serve` on `config` and returns once every worker answers /healthz."""
    path = directory / f"gateway-{config['server']['port']}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    running = GatewayProcess(process, config["server"]["port"])
    running.reader = asyncio.create_task(running._read_logs())
    try:
        workers = config["server"].get("workers", 1)
        await running.wait_for_event("gateway_started", count=workers, within=60)
        await wait_healthy(running.url)
    except BaseException:
        await running.close()
        raise
    return running


async def wait_healthy(url: str, within: float = 20) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(within):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)


async def get_fresh(url: str) -> tuple[int, str]:
    """GET on a new connection (so SO_REUSEPORT may pick any worker); returns status and text."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as response:
        return response.status, await response.text()


@contextlib.asynccontextmanager
async def gateway_process(config: dict[str, Any], directory: Path) -> AsyncIterator[GatewayProcess]:
    running = await start_process(config, directory)
    try:
        yield running
    finally:
        await running.close()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, in a Prometheus exposition."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


__all__ = ["GatewayProcess", "demo_config", "free_port", "gateway_process", "get_fresh",
           "metric_sum", "start_process", "wait_healthy"]  # fmt: skip
