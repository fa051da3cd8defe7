"""Reading a provider's streamed answer: as events for the stages, or as whole-event pieces.

Owns the stream's idle limit (`IdleWatch`: one timer per idle period), mapping a stalled or
broken stream to 504 or 502, and the two framings a `StreamReply` offers. Must not send
requests, retry or fall back: `upstream` does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol, TypeVar

import aiohttp

from gateway import metrics
from gateway.config import Timeouts
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeoutError
from gateway.exchange import StreamReply, Timings
from gateway.sse import SseParser, WholeEvents

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


def own_idle_timer(timeouts: Timeouts) -> bool:
    """Whether `idle` needs watching: a limit no shorter than `total` is aiohttp's."""
    return timeouts.idle < timeouts.total


def stream_reply(
    response: aiohttp.ClientResponse,
    headers: dict[str, str],
    provider: str,
    timeouts: Timeouts,
    timings: Timings,
) -> StreamReply:
    """The provider's streamed answer, readable as events or as whole-event byte pieces."""

    async def close() -> None:
        response.close()

    # Two readers of the one response, neither started: the writer iterates one of them.
    events = _read(response, provider, timeouts, timings, SseParser())
    pieces = _read(response, provider, timeouts, timings, WholeEvents())
    return StreamReply(response.status, headers, events, close, pieces)


class Framing(Protocol[_T_co]):
    def feed(self, chunk: bytes) -> Iterable[_T_co]: ...
    def flush(self) -> Iterable[_T_co]: ...


async def _read(
    response: aiohttp.ClientResponse,
    provider: str,
    timeouts: Timeouts,
    timings: Timings,
    parser: Framing[_T],
) -> AsyncIterator[_T]:
    """Yields what `parser` makes of the chunks as they arrive (events, or whole-event
    pieces); an idle gap or the total deadline (aiohttp's) ends it with 504."""
    content = response.content
    watch = IdleWatch(content, timeouts.idle) if own_idle_timer(timeouts) else None
    try:
        while True:
            try:
                if watch is None:
                    chunk = await content.readany()
                else:
                    watch.waiting()
                    chunk = await content.readany()
                    watch.since = 0.0
            except TimeoutError as exc:
                message = f"The provider {provider!r} stopped sending the stream. Try again later."
                raise counted(provider, "timeout", UpstreamTimeoutError(message)) from exc
            except aiohttp.ClientError as exc:
                message = f"The provider {provider!r} closed the stream before it was complete."
                raise counted(provider, "stream", UpstreamError(message)) from exc
            if not timings.first_chunk:
                timings.first_chunk = time.perf_counter()
            if not chunk:
                break
            for event in parser.feed(chunk):
                yield event
    finally:
        if watch is not None:
            watch.close()
    timings.upstream_done = time.perf_counter()
    for event in parser.flush():
        yield event
    if not response.closed:  # read to its end, it freed its connection already (upstream.py)
        response.release()


class IdleWatch:
    """A stream's `idle` limit at one timer per idle period instead of one per chunk.

    A wait for the next chunk only notes when it began (`waiting`); the timer, due `idle`
    after a wait began, checks whether the wait now in progress has lasted `idle`. If it has,
    the reader gets `TimeoutError`, as aiohttp's own read timeout does; if not, the timer
    re-arms for when it would. Time spent writing to a slow client is not waiting. A timeout
    context per wait cost ~35k instructions per event.
    """

    __slots__ = ("_content", "_idle", "_loop", "_timer", "since")

    def __init__(self, content: aiohttp.StreamReader, idle: float) -> None:
        self._content = content
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self.since = 0.0
        """When the wait in progress began; 0 when not waiting."""

    def waiting(self) -> None:
        self.since = now = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._idle, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self.since:
            return  # not waiting now: the next wait arms the timer again
        due = self.since + self._idle
        if self._loop.time() >= due:
            self._content.set_exception(TimeoutError("no stream chunk within the idle limit"))
        else:
            self._timer = self._loop.call_at(due, self._check)


def counted(provider: str, kind: str, error: GatewayError) -> GatewayError:
    """`error`, counted in `gateway_upstream_errors_total` by provider and kind."""
    metrics.UPSTREAM_ERRORS.labels(provider, kind).inc()
    return error
