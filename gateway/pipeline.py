"""The stage contract and the runner that passes one exchange through the ordered stages.

Owns `Stage` (pass-through defaults), the hook order (requests in list order; responses,
streams and completion in reverse, for the stages that ran) and per-stage timing. Must not
know HTTP or any particular stage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar

import orjson

from gateway import metrics
from gateway.errors import GatewayError, UpstreamError, status_of
from gateway.exchange import Exchange, JsonReply, Reply, StreamReply
from gateway.sse import SseEvent

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
        # Every (stage, hook) child exists from the start, so a scrape lists each one.
        timers = {
            (stage, hook): metrics.observer(metrics.STAGE_SECONDS, stage.name, hook)
            for stage in self.stages
            for hook in ("request", "response", "complete")
        }
        self._requesting = tuple(
            (s, timers[s, "request"] if _overrides(s, "on_request") else None) for s in self.stages
        )
        self._times_requests = any(timer is not None for _, timer in self._requesting)
        # Indexed by how many stages ran: the hooks of those stages, in reverse order.
        self._responding = tuple(
            tuple((s, timers[s, "response"]) for s in stages)
            for stages in _reversed_prefixes(self.stages, "on_response")
        )
        self._completing = tuple(
            tuple((s, timers[s, "complete"]) for s in stages)
            for stages in _reversed_prefixes(self.stages, "on_complete")
        )
        self._streaming = _reversed_prefixes(self.stages, "on_stream")

    async def run(
        self, exchange: Exchange, respond: Callable[[Reply], Awaitable[None] | None]
    ) -> None:
        """Passes the request through every stage, calls the provider, and hands the
        (wrapped) reply to `respond`, which writes it to the client (or returns what writes
        it: one coroutine fewer to resume per stream event than an `async def` wrapper).

        Each hook is timed here, inline: a timing coroutine around it would cost one more
        coroutine per hook on every request. Consecutive hooks share a reading of the clock,
        one's end being the next one's start (only this loop runs between them)."""
        ran = 0
        try:
            started = time.perf_counter() if self._times_requests else 0.0
            for stage, timer in self._requesting:
                ran += 1
                if timer is None:
                    continue
                try:
                    await stage.on_request(exchange)
                finally:
                    ended = time.perf_counter()
                    timer(ended - started)
                    started = ended
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
            completing = self._completing[ran]
            started = time.perf_counter() if completing else 0.0
            for stage, timer in completing:
                try:
                    await stage.on_complete(exchange)
                finally:
                    ended = time.perf_counter()
                    timer(ended - started)
                    started = ended

    async def _wrap(self, exchange: Exchange, reply: Reply, ran: int) -> Reply:
        if isinstance(reply, StreamReply):
            events = reply.events
            for stage in self._streaming[ran]:
                events = stage.on_stream(exchange, events)
            if events is not reply.events:
                reply.events = events
                reply.whole_events = None  # a stage reads the events: they must pass it
            return reply
        wanted = self._responding[ran]
        if not wanted:
            return reply
        completion = _parse_completion(reply)
        started = time.perf_counter()
        for stage, timer in wanted:
            try:
                completion = await stage.on_response(exchange, completion)
            finally:
                ended = time.perf_counter()
                timer(ended - started)
                started = ended
        reply.body = completion
        return reply


def _overrides(stage: Stage, hook: str) -> bool:
    return getattr(type(stage), hook) is not getattr(Stage, hook)


def _reversed_prefixes(stages: tuple[Stage, ...], hook: str) -> tuple[tuple[Stage, ...], ...]:
    """For each count of stages that ran (0 to all), the stages among them overriding
    `hook`, last first."""
    return tuple(
        tuple(s for s in reversed(stages[:ran]) if _overrides(s, hook))
        for ran in range(len(stages) + 1)
    )


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
