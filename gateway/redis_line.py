"""A Redis connection of its own for a hot command: one command at a time, without redis-py's
per-command work.

Owns `RedisLine` (a connection built from a client's pool settings, with its retry and the
command and connect timeouts applied here) and `packed` (a command in Redis's wire form).
Must not know what the commands mean; callers translate errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection


class RedisLine:
    """A connection of its own, with the client's settings, that runs one command at a time
    without the client's per-command work (pool checkout and release, a task and a timer per
    write, a timer per read): a command costs about a quarter as much.

    Its socket has no timeout; `run` applies the client's instead: the connection (TCP within
    the connect timeout, then its handshake) within the call's deadline, then the command and
    its reply within the command timeout. A failure is retried as the client's own retry says
    (once, on a broken connection), and any error or cancellation mid-command drops the
    connection, so a reply is never read by the wrong call.
    """

    __slots__ = ("_connection", "_timeout", "busy")

    def __init__(self, client: Redis, timeout: float) -> None:
        pool = client.connection_pool
        options = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection: AbstractConnection = pool.connection_class(**options)
        self._timeout = timeout
        self.busy = False

    async def run(self, command: bytes, deadline: float) -> Any:
        """The reply to the packed `command`; a ResponseError (NOSCRIPT) is raised."""
        connection = self._connection
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        self.busy = True
        try:
            async with asyncio.timeout_at(min(end, loop.time() + self._timeout)) as scope:
                return await connection.retry.call_with_retry(
                    lambda: self._attempt(command, scope, end),
                    lambda _error: connection.disconnect(),
                )
        finally:
            self.busy = False

    async def _attempt(self, command: bytes, scope: asyncio.Timeout, end: float) -> Any:
        connection = self._connection
        if not connection.is_connected:
            scope.reschedule(end)
            await connection.connect()  # type: ignore[no-untyped-call]
            scope.reschedule(min(end, asyncio.get_running_loop().time() + self._timeout))
        await connection.send_packed_command(command)
        return await connection.read_response()

    async def close(self) -> None:
        await self._connection.disconnect()


def packed(words: Sequence[str]) -> bytes:
    """`words` as one command in Redis's wire form (RESP), as redis-py packs it."""
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
