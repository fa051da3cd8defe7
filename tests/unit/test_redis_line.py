"""`RedisLine` against a real redis-server, on asyncio's loop and on uvloop (the gateway's):
replies and reply errors as redis-py gives them, a killed connection replaced (and a command
cut off by the kill retried once), a stalled Redis failing within the command timeout
without its late reply reaching the next call, a cancelled call, and TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import RedisSettings
from gateway.redis_client import open_redis
from gateway.redis_line import RedisLine, packed
from tests.conftest import free_port

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


Body = Callable[[Any, RedisLine], Awaitable[None]]


@pytest.fixture(params=sorted(LOOPS))
def with_line(request) -> Callable[..., None]:
    """Runs `body(client, line)` on a new loop of the parametrized kind, with a client of
    the settings given (command timeout 2 s unless given) and a line of it; closes both."""

    def run(url: str, body: Body, **options: Any) -> None:
        async def main() -> None:
            settings = RedisSettings(url=url, **{"timeout": 2.0, **options})
            client = open_redis(settings)
            assert isinstance(client, Redis)
            line = RedisLine(client, settings.timeout)
            try:
                await body(client, line)
            finally:
                await line.close()
                await client.aclose()

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(main())

    return run


def command(*words: str) -> bytes:
    return packed(list(words))


async def line_client_id(line: RedisLine) -> int:
    reply = await line.run(command("CLIENT", "ID"), 5.0)
    assert isinstance(reply, int)
    return reply


def test_replies_and_reply_errors_read_as_redis_py_gives_them(redis_server, with_line):
    async def body(client: Any, line: RedisLine) -> None:
        script = "return {1, 'two', {3}, redis.status_reply('OK')}"
        assert await line.run(command("EVAL", script, "0"), 5.0) == [1, b"two", [3], b"OK"]
        await line.run(command("SET", "line:text", "x"), 5.0)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await line.run(command("LPUSH", "line:text", "y"), 5.0)
        with pytest.raises(NoScriptError):
            await line.run(command("EVALSHA", "0" * 40, "0"), 5.0)
        # The connection is still in step after the errors.
        assert await line.run(command("ECHO", "after"), 5.0) == b"after"

    with_line(redis_server.url, body)


def test_a_connection_killed_while_idle_is_replaced_on_the_next_call(redis_server, with_line):
    async def body(client: Any, line: RedisLine) -> None:
        first = await line_client_id(line)
        await client.execute_command("CLIENT", "KILL", "ID", str(first))
        second = await line_client_id(line)
        assert second != first

    with_line(redis_server.url, body)


def test_a_command_cut_off_by_a_killed_connection_is_retried_once(redis_server, with_line):
    async def body(client: Any, line: RedisLine) -> None:
        first = await line_client_id(line)
        popping = asyncio.ensure_future(line.run(command("BLPOP", "line:q", "4"), 5.0))
        await _until_blocked(client, 1)
        await client.execute_command("CLIENT", "KILL", "ID", str(first))
        await _until_blocked(client, 1)  # the retry, on a new connection
        await client.rpush("line:q", "value")
        assert await popping == [b"line:q", b"value"]
        assert await line_client_id(line) != first

    with_line(redis_server.url, body, timeout=5.0)


def test_a_second_broken_connection_is_not_retried(redis_server, with_line):
    async def body(client: Any, line: RedisLine) -> None:
        popping = asyncio.ensure_future(line.run(command("BLPOP", "line:q2", "4"), 5.0))
        for _ in range(2):
            await _until_blocked(client, 1)
            await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        with pytest.raises(RedisConnectionError):
            await popping

    with_line(redis_server.url, body, timeout=5.0)


def test_a_stalled_redis_fails_in_time_and_its_late_reply_reaches_nobody(redis_server, with_line):
    async def body(client: Any, line: RedisLine) -> None:
        await line.run(command("SET", "line:n", "5"), 5.0)
        await client.execute_command("CLIENT", "PAUSE", "700", "ALL")
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await line.run(command("INCR", "line:n"), 5.0)
        assert time.monotonic() - started < 0.6  # the command timeout, not the pause
        # Once the pause ends, the next call is answered with its own reply, never with
        # the INCR's (which Redis may still run for the dropped connection).
        assert await line.run(command("ECHO", "mine"), 5.0) == b"mine"

    with_line(redis_server.url, body, timeout=0.2)


def test_the_call_deadline_bounds_the_command_timeout(redis_server, with_line):
    async def body(client: Any, line: RedisLine) -> None:
        await line.run(command("PING"), 5.0)
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await line.run(command("BLPOP", "line:never", "3"), 0.2)
        assert time.monotonic() - started < 1.0

    with_line(redis_server.url, body, timeout=5.0)


def test_a_cancelled_call_drops_its_connection_and_the_next_call_reads_its_own_reply(
    redis_server, with_line
):
    async def body(client: Any, line: RedisLine) -> None:
        first = await line_client_id(line)
        popping = asyncio.ensure_future(line.run(command("BLPOP", "line:c", "3"), 5.0))
        await _until_blocked(client, 1)
        popping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await popping
        assert not line.busy
        await client.rpush("line:c", "late")  # nobody is left to be handed this
        assert await line.run(command("ECHO", "own"), 5.0) == b"own"
        assert await line_client_id(line) != first

    with_line(redis_server.url, body, timeout=5.0)


def test_nothing_listening_fails_as_a_connection_error(with_line):
    async def body(client: Any, line: RedisLine) -> None:
        with pytest.raises(RedisConnectionError):
            await line.run(command("PING"), 2.0)

    with_line(f"redis://127.0.0.1:{free_port()}/0", body, connect_timeout=1.0)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A private redis-server that speaks only TLS, with a certificate made for this test."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_tls(port)
        yield f"rediss://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


def test_a_tls_connection_is_read_by_the_line(tls_redis, with_line):
    async def body(client: Any, line: RedisLine) -> None:
        assert await line.run(command("ECHO", "over tls"), 5.0) == b"over tls"
        first = await line_client_id(line)
        await client.execute_command("CLIENT", "KILL", "ID", str(first))
        assert await line_client_id(line) != first

    with_line(tls_redis, body, tls_verify=False)


async def _until_blocked(client: Any, count: int) -> None:
    """Waits until `count` clients are blocked on a list (at most 3 s)."""
    end = time.monotonic() + 3.0
    while (await client.info("clients"))["blocked_clients"] != count:
        assert time.monotonic() < end, "the command never blocked"
        await asyncio.sleep(0.01)


def _wait_tls(port: int) -> None:
    import socket

    end = time.monotonic() + 10.0
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
