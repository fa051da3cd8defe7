"""The stage contract and the runner that passes one exchange through the ordered stages.

Owns `Stage` (pass-through defaults), the hook order (requests in list order; responses,
streams and completion in reverse, for the stages that ran) and per-stage timing. Must not
know HTTP or any particular stage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import orjson

from gateway import metrics
from gateway.errors import GatewayError, UpstreamError, status_of
from gateway.exchange import Exchange, JsonReply, Reply, StreamReply
from gateway.sse import SseEvent

_T = TypeVar("_T")

Forward = Callable[[Exchange], Awaitable[Reply]]


class Stage:
    """A step of the pipeline. Every hook passes through unless overridden."""

    name: ClassVar[str] = "stage"

    async def on_request(self, exchange: Exchange) -> None:
        """May change `exchange.body` (then call `mark_changed`) or raise a `GatewayError`."""

    async def on_response(self, exchange: Exchange, completion: dict[str, Any]) -> dict[str, Any]:
        """Returns the full JSON completion, possibly changed."""
        return completion

    def on_stream(
        self, exchange: Exchange, events: AsyncIterator[SseEvent]
    ) -> AsyncIterator[SseEvent]:
        """Wraps the stream of events; keeps per-request state and flushes at the end."""
        return events

    async def on_complete(self, exchange: Exchange) -> None:
        """Runs once the client has its answer or error, for every stage whose request hook ran."""


class Pipeline:
    """Runs an exchange through `stages` around `forward` (the provider call).

    A hook a stage does not override is not called at all: the default would only pass
    through, and each call costs a coroutine and a timing on every request.
    """

    def __init__(self, stages: Sequence[Stage], forward: Forward) -> None:
        self.stages = tuple(stages)
        self._forward = forward
        self._timers = {
            (stage, hook): metrics.observer(metrics.STAGE_SECONDS, stage.name, hook)
            for stage in self.stages
            for hook in ("request", "response", "complete")
        }
        self._request_stages = _overriding(self.stages, "on_request")
        self._response_stages = _overriding(self.stages, "on_response")
        self._stream_stages = _overriding(self.stages, "on_stream")
        self._complete_stages = _overriding(self.stages, "on_complete")

    async def run(
        self, exchange: Exchange, respond: Callable[[Reply], Awaitable[None] | None]
    ) -> None:
        """Passes the request through every stage, calls the provider, and hands the
        (wrapped) reply to `respond`, which writes it to the client (or returns what writes
        it: one coroutine fewer to resume per stream event than an `async def` wrapper)."""
        ran: list[Stage] = []
        try:
            for stage in self.stages:
                ran.append(stage)
                if stage in self._request_stages:
                    await self._timed(stage, "request", stage.on_request(exchange))
            reply = await self._forward(exchange)
            exchange.status = reply.status
            writing = respond(await self._wrap(exchange, reply, ran))
            if writing is not None:
                await writing
        except GatewayError as error:
            exchange.status = status_of(error)
            exchange.error_code = error.error_code
            raise
        except Exception:
            exchange.status = 500
            exchange.error_code = "internal_error"
            raise
        finally:
            if exchange.status == 0:
                exchange.status = 499  # the client went away before an answer
            for stage in reversed(ran):
                if stage in self._complete_stages:
                    await self._timed(stage, "complete", stage.on_complete(exchange))

    async def _wrap(self, exchange: Exchange, reply: Reply, ran: list[Stage]) -> Reply:
        if isinstance(reply, StreamReply):
            events = reply.events
            for stage in reversed(ran):
                if stage in self._stream_stages:
                    events = stage.on_stream(exchange, events)
            if events is not reply.events:
                reply.events = events
                reply.whole_events = None  # a stage reads the events: they must pass it
            return reply
        wanted = [s for s in reversed(ran) if s in self._response_stages]
        if not wanted:
            return reply
        completion = _parse_completion(reply)
        for stage in wanted:
            completion = await self._timed(
                stage, "response", stage.on_response(exchange, completion)
            )
        reply.body = completion
        return reply

    async def _timed(self, stage: Stage, hook: str, call: Awaitable[_T]) -> _T:
        started = time.perf_counter()
        try:
            return await call
        finally:
            self._timers[stage, hook](time.perf_counter() - started)


def _overriding(stages: Sequence[Stage], hook: str) -> frozenset[Stage]:
    return frozenset(s for s in stages if getattr(type(s), hook) is not getattr(Stage, hook))


def _parse_completion(reply: JsonReply) -> dict[str, Any]:
    if reply.body is not None:
        return reply.body
    try:
        body = orjson.loads(reply.raw)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("The provider answered with a body that is not JSON.") from exc
    if not isinstance(body, dict):
        raise UpstreamError("The provider answered with JSON that is not an object.")
    return body
