"""`RateLimit`: reserves every limit of a request before the provider call and settles after.

Owns which limits apply (per key or subject, tenant, model, global; tiers assigned by key,
claim or tenant, with per-key overrides), the token reservation (offline prompt estimate plus
the completion maximum), asking providers for stream usage (and hiding that extra chunk from
clients that did not ask), cutting a stream at its budget (metered by `gateway.stream_meter`),
the `x-ratelimit-*` headers and the 429 answers. Must not talk to Redis (the `Limiter` does)
nor keep state outside the exchange.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from gateway.config import LimitSettings, LimitValues
from gateway.errors import QuotaExceededError, RateLimitError, ServiceUnavailableError
from gateway.exchange import Exchange, Principal, Usage
from gateway.limiter import Limiter
from gateway.limits import Ask, Decision, Limit, Reservation
from gateway.pipeline import Stage
from gateway.sse import SseEvent
from gateway.stream_meter import StreamMeter, usage_of
from gateway.tokens import CAP_FIELDS, CHARS_PER_TOKEN, completion_cap, count_prompt

ANONYMOUS = "anonymous"
USAGE_ENDPOINTS = ("chat.completions", "completions")  # streams that take stream_options
_PERIOD = {"daily_tokens": "day", "monthly_tokens": "month"}
_MILLISECONDS = tuple(f"{ms}ms" for ms in range(1000))  # resets under a second, made once
_PLANS_KEPT = 65_536  # callers whose plans are kept


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where a reply holds the header values when one request limit and one token limit apply
    (so neither is chosen as the tightest): their limits as text, the reply index of each
    one's remaining, and the length of a reply that covers every limit."""

    requests_limit: str
    at_requests: int
    tokens_limit: str
    at_tokens: int
    length: int


@dataclass(frozen=True, slots=True)
class _Plan:
    """What applies to one caller and model, worked out once: the dimensions and their values
    (none when nothing limits the caller), their limits (None when a budget applies: its
    limits follow the clock, so each request builds them), whether a budget applies, usage
    is metered and a slot is held, and where the headers are in a reply (None: look)."""

    found: tuple[tuple[str, str, LimitValues], ...]
    limits: tuple[Limit, ...] | None
    budget: bool
    metered: bool
    holds_slot: bool
    layout: _Layout | None = None


@dataclass(slots=True)
class Ticket:
    """What the request reserved: the limiter's reservation, the prompt estimate, the
    completion tokens a budget allows (None when no budget applies), whether a token limit
    applies (then usage is metered) and whether a concurrency slot is held.

    Never changed once made, yet not frozen: one is made per request, and a frozen dataclass
    sets each field through `object.__setattr__` (as `gateway.limits` explains for its values)."""

    reservation: Reservation
    prompt_tokens: int
    allowance: int | None
    metered: bool
    holds_slot: bool


class RateLimit(Stage):
    name = "rate_limit"

    def __init__(self, limiter: Limiter, settings: LimitSettings) -> None:
        self._limiter = limiter
        self._settings = settings
        self._merged: dict[tuple[str, str | None], LimitValues] = {}
        self._plans: dict[tuple[str | None, ...], _Plan] = {}  # caller and model -> plan

    async def on_request(self, exchange: Exchange) -> None:
        if exchange.endpoint == "models":
            return
        plan = self._plan(exchange)
        if not plan.found:
            exchange.ratelimit_outcome = "unlimited"
            return
        ask, prompt = self._ask(exchange, plan)
        try:
            decision = await self._limiter.reserve(ask)
        except ServiceUnavailableError:
            exchange.ratelimit_outcome = "unavailable"
            raise
        headers = _headers(plan.layout, decision)
        reservation = decision.reservation
        if reservation is None:
            raise _refusal(exchange, decision, headers, ask)
        exchange.response_headers.update(headers)
        local = reservation.backend == "memory" and self._limiter.redis is not None
        exchange.ratelimit_outcome = "allowed_local" if local else "allowed"
        allowance = reservation.granted - prompt if plan.budget and ask.tokens > prompt else None
        ticket = Ticket(reservation, prompt, allowance, plan.metered, plan.holds_slot)
        exchange.ratelimit_reservation = ticket
        _prepare_body(exchange, ticket, ask)

    async def on_response(self, exchange: Exchange, completion: dict[str, Any]) -> dict[str, Any]:
        usage = usage_of(completion)
        if usage is not None and exchange.usage is None:
            exchange.usage = usage
        return completion

    def on_stream(
        self, exchange: Exchange, events: AsyncIterator[SseEvent]
    ) -> AsyncIterator[SseEvent]:
        ticket = exchange.ratelimit_reservation
        if not isinstance(ticket, Ticket) or not ticket.metered:
            return events
        return _metered(exchange, ticket, events)

    async def on_complete(self, exchange: Exchange) -> None:
        ticket = exchange.ratelimit_reservation
        if not isinstance(ticket, Ticket):
            return
        reservation = ticket.reservation
        used = _used(exchange, ticket) if ticket.metered else reservation.granted
        if used != reservation.granted or ticket.holds_slot:  # else nothing to settle
            settling = self._limiter.settle(reservation, used)
            if settling is not None:
                await settling  # Redis holds the settlement before the answer goes

    def _plan(self, exchange: Exchange) -> _Plan:
        """The caller's plan: what it depends on (model, key, subject, tenant, tier) is its key."""
        principal = exchange.principal
        caller = (
            (exchange.model,)
            if principal is None
            else (exchange.model, principal.key_id, principal.subject, principal.tenant,
                  principal.tier)
        )  # fmt: skip
        plan = self._plans.get(caller)
        if plan is None:
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()  # many idle callers: start over rather than grow
            plan = self._plans[caller] = self._new_plan(exchange, principal)
        return plan

    def _new_plan(self, exchange: Exchange, principal: Principal | None) -> _Plan:
        found = tuple(self._dimensions(exchange, principal))
        limits = self._limits_of(found)
        if not limits:  # dimensions whose values set no limit: unlimited
            return _Plan((), (), budget=False, metered=False, holds_slot=False)
        kinds = {lim.kind for lim in limits}
        fixed = "b" not in kinds  # budgets follow the clock: their limits are built anew
        return _Plan(found, limits if fixed else None, budget=not fixed,
                     metered=bool(kinds & {"b", "t"}), holds_slot="c" in kinds,
                     layout=_layout_of(limits))  # fmt: skip

    def _limits_of(self, found: tuple[tuple[str, str, LimitValues], ...]) -> tuple[Limit, ...]:
        limits_for = self._limiter.limits_for
        groups = [limits_for(values, dimension, ident) for dimension, ident, values in found]
        return tuple(groups[0]) if len(groups) == 1 else tuple(chain.from_iterable(groups))

    def _ask(self, exchange: Exchange, plan: _Plan) -> tuple[Ask, int]:
        limits = plan.limits if plan.limits is not None else self._limits_of(plan.found)
        endpoint, body = exchange.endpoint, exchange.body
        prompt = count_prompt(endpoint, body)
        cap = 0 if endpoint == "embeddings" else self._cap(exchange)
        least = prompt + (1 if cap else 0)
        return Ask(self._limiter.request_id(), limits, prompt + cap, least), prompt

    def _cap(self, exchange: Exchange) -> int:
        return completion_cap(exchange.endpoint, exchange.body) or self._settings.default_max_tokens

    def _dimensions(
        self, exchange: Exchange, principal: Principal | None
    ) -> list[tuple[str, str, LimitValues]]:
        settings = self._settings
        found: list[tuple[str, str, LimitValues]] = []
        key_values = self._key_values(principal)
        if key_values is not None:
            ident = (principal.key_id or principal.subject) if principal else ANONYMOUS
            found.append(("key", ident, key_values))
        tenant = principal.tenant if principal else None
        tenant_values = settings.tenants.get(tenant, settings.tenant_default) if tenant else None
        if tenant and tenant_values is not None:
            found.append(("tenant", tenant, tenant_values))
        model_values = settings.models.get(exchange.model or "")
        if model_values is not None:
            found.append(("model", exchange.model or "", model_values))
        if settings.global_limits is not None:
            found.append(("global", "all", settings.global_limits))
        return found

    def _key_values(self, principal: Principal | None) -> LimitValues | None:
        """The caller's tier, with its per-key override applied."""
        assignment = self._settings.assignment
        override_name = None
        if principal is not None:
            for name in (principal.key_id, principal.subject):
                if name is not None and name in assignment.keys:
                    override_name = name
                    break
        override = assignment.keys.get(override_name) if override_name else None
        tier = (override.tier if override else None) or self._tier_of(principal)
        if override is None or override_name is None:
            return self._settings.tiers.get(tier) if tier else None
        cached = self._merged.get((override_name, tier))
        if cached is None:
            base = self._settings.tiers[tier].model_dump() if tier else {}
            changes = override.model_dump(exclude={"tier"}, exclude_none=True)
            cached = LimitValues.model_validate({**base, **changes})
            self._merged[(override_name, tier)] = cached
        return cached

    def _tier_of(self, principal: Principal | None) -> str | None:
        assignment = self._settings.assignment
        if principal is not None and principal.tier:
            if principal.tier in self._settings.tiers:
                return principal.tier
            if principal.tier in assignment.by_claim:
                return assignment.by_claim[principal.tier]
        if principal is not None and principal.tenant in assignment.by_tenant:
            return assignment.by_tenant[principal.tenant or ""]
        return assignment.default_tier


def _prepare_body(exchange: Exchange, ticket: Ticket, ask: Ask) -> None:
    """Asks the provider for stream usage, and lowers the completion cap to what was granted."""
    if not ticket.metered:
        return
    body = exchange.body
    asks_usage = exchange.is_stream and exchange.endpoint in USAGE_ENDPOINTS
    if asks_usage and not exchange.client_wants_usage:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        exchange.mark_changed()
    if ticket.reservation.granted < ask.tokens and ticket.allowance is not None:
        fields = CAP_FIELDS.get(exchange.endpoint, ())
        given = [name for name in fields if name in body] or list(fields[:1])
        for name in given:
            body[name] = ticket.allowance
        exchange.mark_changed()


def _used(exchange: Exchange, ticket: Ticket) -> int:
    """Tokens to charge: the provider's usage, else nothing if it never answered, else all."""
    if exchange.usage is not None:
        return exchange.usage.total_tokens
    if exchange.upstream_attempts == 0:
        return 0
    if exchange.status >= 400 and exchange.status != 499:
        return 0
    return ticket.reservation.granted


async def _metered(
    exchange: Exchange, ticket: Ticket, events: AsyncIterator[SseEvent]
) -> AsyncIterator[SseEvent]:
    """Records usage, hides the usage chunk the client did not ask for, and cuts at a budget."""
    meter = StreamMeter(exchange, ticket.prompt_tokens, ticket.allowance)
    try:
        async for event in events:
            for out in meter.feed(event):
                yield out
            if meter.cut:
                return
    finally:
        if exchange.usage is None and meter.chars:
            completion = math.ceil(meter.chars / CHARS_PER_TOKEN)
            exchange.usage = Usage(ticket.prompt_tokens, completion)


def _layout_of(limits: Sequence[Limit]) -> _Layout | None:
    """Where the header values are in a reply to `limits`, if they name one request limit
    and one token limit (a budget's limit stays the same as its period goes on)."""
    requests = [i for i, lim in enumerate(limits) if lim.kind == "r"]
    tokens = [i for i, lim in enumerate(limits) if lim.kind in ("t", "b")]
    if len(requests) != 1 or len(tokens) != 1:
        return None
    request, token = limits[requests[0]], limits[tokens[0]]
    at_requests, at_tokens, length = 4 + 2 * requests[0], 4 + 2 * tokens[0], 4 + 2 * len(limits)
    return _Layout(str(request.limit), at_requests, str(token.limit), at_tokens, length)


def _headers(layout: _Layout | None, decision: Decision) -> dict[str, str]:
    """`rate_headers` of the decision, read at the plan's places when it has them (the loop
    that finds the tightest costs as much as the headers themselves)."""
    reply = decision.reply
    if layout is None or len(reply) < layout.length:
        return rate_headers(decision.limits, reply)
    at_requests, at_tokens = layout.at_requests, layout.at_tokens
    return {
        "x-ratelimit-limit-requests": layout.requests_limit,
        "x-ratelimit-remaining-requests": str(reply[at_requests]),
        "x-ratelimit-reset-requests": duration(reply[at_requests + 1]),
        "x-ratelimit-limit-tokens": layout.tokens_limit,
        "x-ratelimit-remaining-tokens": str(reply[at_tokens]),
        "x-ratelimit-reset-tokens": duration(reply[at_tokens + 1]),
    }


def rate_headers(limits: Sequence[Limit], reply: Sequence[int]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest request limit and token limit, read from
    the script's `reply`: the remaining and reset ms of each of `limits` in turn from index 4
    (a short reply: the limits it covers)."""
    requests = tokens = None
    at_requests = at_tokens = 0  # the reply index of the tightest one's remaining
    at, end = 4, len(reply) - 1
    for lim in limits:  # (not zip: its keyword argument alone costs more than this loop)
        if at >= end:
            break
        kind = lim.kind
        if kind == "r":
            if requests is None or _tighter(reply, at_requests, at):
                requests, at_requests = lim, at
        elif (kind == "t" or kind == "b") and (tokens is None or _tighter(reply, at_tokens, at)):
            tokens, at_tokens = lim, at
        at += 2
    headers: dict[str, str] = {}
    if requests is not None:
        headers["x-ratelimit-limit-requests"] = str(requests.limit)
        headers["x-ratelimit-remaining-requests"] = str(reply[at_requests])
        headers["x-ratelimit-reset-requests"] = duration(reply[at_requests + 1])
    if tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(tokens.limit)
        headers["x-ratelimit-remaining-tokens"] = str(reply[at_tokens])
        headers["x-ratelimit-reset-tokens"] = duration(reply[at_tokens + 1])
    return headers


def _tighter(reply: Sequence[int], best: int, at: int) -> bool:
    """Whether the limit at `at` is tighter than the best so far: less remaining; on a tie,
    longer to reset (else the first of equals stays)."""
    if reply[at] != reply[best]:
        return reply[at] < reply[best]
    return reply[at + 1] > reply[best + 1]


def duration(ms: int) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`, `1h2m3.5s`."""
    if ms < 1000:
        return _MILLISECONDS[ms] if ms > 0 else "0ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


def _refusal(
    exchange: Exchange, decision: Decision, headers: dict[str, str], ask: Ask
) -> RateLimitError | QuotaExceededError:
    blocked = decision.blocked
    assert blocked is not None  # noqa: S101 - a refused decision names its limit
    who = {"key": "your key", "tenant": "your organization", "model": "this model",
           "global": "this gateway"}[blocked.dimension]  # fmt: skip
    if blocked.kind == "b":
        exchange.ratelimit_outcome = "quota"
        period = _PERIOD[blocked.name]
        message = (f"You exceeded the {period}ly token budget of {who} ({blocked.limit} tokens). "
                   f"It renews at the start of the next {period} (UTC).")  # fmt: skip
        return QuotaExceededError(message, headers={**headers, "x-should-retry": "false"})
    exchange.ratelimit_outcome = "limited"
    if decision.retry_ms < 0:
        message = (f"Request too large: it may use {ask.tokens} tokens but the limit of {who} "
                   f"is {blocked.limit} tokens per minute. Lower max_tokens or shorten the "
                   "prompt.")  # fmt: skip
        extra = {**headers, "x-should-retry": "false"}
        return RateLimitError(message, retry_after=blocked.window_ms / 1000, headers=extra)
    seconds = decision.retry_ms / 1000
    message = (f"Rate limit reached for {who}: {blocked.limit} {_describe(blocked)}. "
               f"Try again in {seconds:.3g}s.")  # fmt: skip
    extra = {**headers, "retry-after-ms": str(decision.retry_ms)}
    return RateLimitError(message, retry_after=seconds, headers=extra)


def _describe(limit: Limit) -> str:
    return {"requests_per_second": "requests per second",
            "requests_per_minute": "requests per minute",
            "tokens_per_minute": "tokens per minute",
            "concurrent": "requests in flight"}.get(limit.name, limit.name)  # fmt: skip
