"""A Redis connection of its own for a hot command: one command at a time, without redis-py's
per-command work.

Owns `RedisLine` (a connection opened by redis-py with a client's settings, then read by a
protocol of its own), `packed` (a command in Redis's wire form) and how a reply error reads as
a redis-py exception. Must not know what the commands mean; callers translate errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_CLOSED = "Connection to Redis closed."


class RedisLine:
    """A connection of its own, with the client's settings, that runs one command at a time.

    redis-py opens the connection (TCP or TLS or a socket file, the handshake, Sentinel's
    master); then the line takes the transport over and reads replies with its own protocol,
    without redis-py's per-command layers (retry wrapper, health check, drain, parser, stream
    reader): a command costs a write, a future and a timer.

    `run` keeps the client's timeouts: the connection within the call's deadline, then the
    command and its reply within the command timeout. A broken connection is retried once on
    a new one, as the client's own retry does; a timeout is not. Any error or cancellation
    mid-command drops the connection, so a reply is never read by the wrong call. Replies are
    not decoded (bytes, as the client gives them without `decode_responses`).
    """

    __slots__ = ("_client", "_protocol", "_timeout", "busy")

    def __init__(self, client: Redis, timeout: float) -> None:
        self._client = client
        self._protocol: _LineProtocol | None = None
        self._timeout = timeout
        self.busy = False

    async def run(self, command: bytes, deadline: float) -> Any:
        """The reply to the packed `command`; a reply error is raised (NOSCRIPT as
        `NoScriptError`), a lost connection as redis-py's `ConnectionError`, a late reply as
        its `TimeoutError`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        self.busy = True
        try:
            try:
                return await self._attempt(command, loop, end)
            except RedisConnectionError:
                return await self._attempt(command, loop, end)  # once, on a new connection
        finally:
            self.busy = False

    async def _attempt(self, command: bytes, loop: asyncio.AbstractEventLoop, end: float) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = self._protocol = await self._connect(end)
        reply = protocol.send(command)
        timer = loop.call_at(min(end, loop.time() + self._timeout), protocol.expire, reply)
        try:
            return await reply
        except BaseException:
            protocol.drop()  # whatever comes next on this connection is not for the next call
            raise
        finally:
            timer.cancel()

    async def _connect(self, end: float) -> _LineProtocol:
        pool = self._client.connection_pool
        options = {**pool.connection_kwargs, "socket_timeout": None}
        connection: AbstractConnection = pool.connection_class(**options)
        try:
            async with asyncio.timeout_at(end):
                await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        return _LineProtocol.take_over(connection)

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.drop()
            self._protocol = None


class _LineProtocol(asyncio.Protocol):
    """Reads the replies on one connection, each to the future of the command that asked."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        # The writer is kept while the transport lives: it closes the transport when
        # collected (with a ResourceWarning).
        self._writer = writer
        self._transport = writer.transport
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=reply_error)
        self._waiting: asyncio.Future[Any] | None = None
        self.closed = False

    @classmethod
    def take_over(cls, connection: AbstractConnection) -> _LineProtocol:
        """The protocol of `connection`'s transport from now on; redis-py lets go of it. Its
        handshake's replies have all been read, so nothing is buffered."""
        writer = connection._writer  # (redis-py keeps its streams private)
        if writer is None:
            raise RedisConnectionError(_CLOSED)
        connection._reader = connection._writer = None
        protocol = cls(writer)
        protocol._transport.set_protocol(protocol)
        if protocol._transport.is_closing():  # closed before the protocol was set
            protocol.closed = True
        return protocol

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """The future of `command`'s reply. The transport buffers what the socket does not
        take: a command is a few kilobytes, and the next waits for this one's reply."""
        if self.closed:
            raise RedisConnectionError(_CLOSED)
        waiting = self._waiting = asyncio.get_running_loop().create_future()
        self._transport.write(command)
        return waiting

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            reply = reader.gets()
            while reply is not False:
                waiting, self._waiting = self._waiting, None
                if waiting is None:  # nobody asked: this connection is out of step
                    self._fail(InvalidResponse("Redis sent a reply nobody asked for."))
                    return
                if not waiting.done():
                    if isinstance(reply, ResponseError):
                        waiting.set_exception(reply)
                    else:
                        waiting.set_result(reply)
                reply = reader.gets()
        except InvalidResponse as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.done():
            error = RedisConnectionError(_CLOSED)
            error.__cause__ = exc
            waiting.set_exception(error)

    def expire(self, waiting: asyncio.Future[Any]) -> None:
        """Fails `waiting` for want of a reply in time."""
        if not waiting.done():
            waiting.set_exception(RedisTimeoutError("Redis did not answer in time."))

    def drop(self) -> None:
        """Closes the connection at once, failing a command still waiting."""
        self.closed = True
        self._transport.abort()

    def _fail(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.done():
            waiting.set_exception(error)
        self.drop()


def reply_error(message: str) -> ResponseError:
    """A reply error as redis-py's exception for it: NOSCRIPT apart, since callers load the
    script and run again; any other is a `ResponseError`."""
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message.removeprefix("NOSCRIPT "))
    return ResponseError(message)


def packed(words: Sequence[str]) -> bytes:
    """`words` as one command in Redis's wire form (RESP), as redis-py packs it."""
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
