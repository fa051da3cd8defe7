"""Calls to model providers: the one outbound HTTP client of the gateway.

Owns the aiohttp client session, provider dialects (OpenAI-compatible, Azure), header hygiene,
timeouts, retries with backoff, fallback providers and the translation of aiohttp errors into
gateway errors; reading a streamed answer is `upstream_stream`'s. Must not look at completions
beyond status and framing.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gateway import metrics
from gateway.config import ProviderSettings, Settings, Timeouts
from gateway.deadlines import DeadlineWatch
from gateway.errors import (
    GatewayError,
    NotFoundError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from gateway.exchange import Exchange, JsonReply, Reply
from gateway.upstream_stream import counted, stream_reply

PATHS = {
    "chat.completions": "/chat/completions",
    "responses": "/responses",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
# Provider headers worth returning; set-cookie, rate-limit and server details are not.
RETURNED_RESPONSE_HEADERS = {
    "openai-processing-ms": "openai-processing-ms",
    "openai-version": "openai-version",
    "x-request-id": "x-upstream-request-id",
}
_RETRY_JITTER = random.Random()  # noqa: S311 - jitter is not a security decision


@dataclass(frozen=True, slots=True)
class Target:
    """One provider as the client sees it: resolved URL root, key and settings, and the client
    headers it receives (`forward_headers`: exact names, and prefixes from `name*`)."""

    name: str
    base_url: str
    settings: ProviderSettings
    forwarded: tuple[str, ...] = ()
    forwarded_prefixes: tuple[str, ...] = ()
    credential: tuple[str, str] | None = field(init=False, default=None, repr=False)
    """The provider key as the header that carries it, read out of its `SecretStr` once."""

    def __post_init__(self) -> None:
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        if key:
            header = (
                ("api-key", key)
                if self.settings.kind == "azure"
                else ("Authorization", f"Bearer {key}")
            )
            object.__setattr__(self, "credential", header)

    @classmethod
    def of(cls, name: str, base_url: str, settings: ProviderSettings) -> Target:
        names = settings.forward_headers
        exact = tuple(n for n in names if not n.endswith("*"))
        prefixes = tuple(n.removesuffix("*") for n in names if n.endswith("*"))
        return cls(name, base_url.rstrip("/"), settings, exact, prefixes)


class ProviderRequest(aiohttp.ClientRequest):
    """aiohttp's request, without its `User-Agent`: the provider learns nothing of the
    gateway's software (a client's own `User-Agent` goes when `forward_headers` names it).

    `skip_auto_headers` would do the same at the cost of two header-dict copies per request.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        headers = self.headers
        for name, value in self.DEFAULT_HEADERS.items():
            if name not in headers:
                headers[name] = value


def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    """The timeouts aiohttp enforces: connect, and the total deadline (which also covers
    reading the body or stream). The waits for headers (`first_byte`), for a whole body and
    between stream chunks (`idle`) are ours (`DeadlineWatch`, `upstream_stream.IdleWatch`):
    aiohttp's socket read timeout would re-arm a loop timer for every chunk received.
    `ceil_threshold=inf` keeps deadlines exact (aiohttp would round long ones up a second).
    """
    return aiohttp.ClientTimeout(
        total=timeouts.total, connect=timeouts.connect, sock_connect=timeouts.connect,
        ceil_threshold=math.inf,
    )  # fmt: skip


class UpstreamClient:
    """Sends an exchange to its provider, retrying and falling back before any byte is sent."""

    def __init__(self, settings: Settings, base_urls: Mapping[str, str] | None = None) -> None:
        resolved = dict(base_urls or {})
        self._targets = {
            name: Target.of(name, resolved.get(name, p.base_url), p)
            for name, p in settings.providers.items()
        }
        self._timeouts = {
            name: client_timeout(p.timeouts) for name, p in settings.providers.items()
        }
        self._header_seconds = {  # each provider's child made once, not looked up per request
            name: metrics.observer(metrics.UPSTREAM_SECONDS, name) for name in settings.providers
        }
        self._fallback_models = {m.name: dict(m.fallback_models) for m in settings.models}
        self._deadlines = DeadlineWatch()
        pool = max(p.max_connections for p in settings.providers.values())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool, ttl_dns_cache=300),
            auto_decompress=True,
            request_class=ProviderRequest,
            json_serialize=lambda value: orjson.dumps(value).decode(),
        )

    async def close(self) -> None:
        await self._session.close()

    def forward(self, exchange: Exchange) -> Awaitable[Reply]:
        """The pipeline's terminal step. Raises `GatewayError` subclasses only (an unknown
        model's `NotFoundError` at once, the others when awaited).

        Returns the innermost coroutine the route needs, not one awaiting it: every frame
        between the request's task and the provider call is resumed each time the provider's
        answer wakes the request. Without fallbacks the chain is one provider; without
        retries, one attempt, whose failure is raised as it is either way."""
        route = exchange.route
        if route is None:
            raise NotFoundError(
                f"The model {exchange.model!r} does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        target = self._targets[route.provider]
        if target.settings.fallbacks:
            return self._fall_back(exchange, target)
        if target.settings.retries.attempts:
            return self._try_provider(exchange, target)
        exchange.upstream_attempts += 1
        return self._send(exchange, target)

    async def _fall_back(self, exchange: Exchange, first: Target) -> Reply:
        chain = [first.name, *first.settings.fallbacks]
        last: GatewayError | None = None
        for index, name in enumerate(chain):
            if index:
                metrics.UPSTREAM_RETRIES.labels(name, "fallback").inc()
            target = self._targets[name]
            try:
                return await self._try_provider(exchange, target)
            except (UpstreamError, UpstreamTimeoutError, UpstreamStatusError) as error:
                if _retry_delay(error, 0, target.settings) is None:
                    raise
                last = error
        assert last is not None  # noqa: S101 - the chain always has one provider
        raise last

    async def _try_provider(self, exchange: Exchange, target: Target) -> Reply:
        retries = target.settings.retries
        attempt = 0
        while True:
            exchange.upstream_attempts += 1
            try:
                return await self._send(exchange, target)
            except (UpstreamError, UpstreamTimeoutError, UpstreamStatusError) as error:
                delay = _retry_delay(error, attempt, target.settings)
                if delay is None or attempt >= retries.attempts:
                    raise
            metrics.UPSTREAM_RETRIES.labels(target.name, "retry").inc()
            await asyncio.sleep(delay)
            attempt += 1

    async def _send(self, exchange: Exchange, target: Target) -> Reply:
        url, headers, data = self._request_for(exchange, target)
        timeouts = target.settings.timeouts
        exchange.provider = target.name
        exchange.timings.upstream_sent = time.perf_counter()
        try:
            request = self._session.post(
                url, data=data, headers=headers, timeout=self._timeouts[target.name]
            )
            with self._deadlines.within(timeouts.first_byte):
                response = await request
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(target, exc) from exc
        exchange.timings.upstream_headers = time.perf_counter()
        self._header_seconds[target.name](
            exchange.timings.upstream_headers - exchange.timings.upstream_sent
        )
        returned = _returned_headers(response.headers)
        if response.status >= 400:
            body = await self._read_all(response, target)
            raise counted(target.name, "status", _status_error(response, body, returned))
        if exchange.is_stream and response.content_type == "text/event-stream":
            return stream_reply(response, returned, target.name, timeouts, exchange.timings)
        raw = await self._read_all(response, target)
        exchange.timings.upstream_done = time.perf_counter()
        return JsonReply(response.status, returned, raw)

    async def _read_all(self, response: aiohttp.ClientResponse, target: Target) -> bytes:
        """The whole body, within `idle` of its headers and the request's total deadline."""
        try:
            if response.content.is_eof():  # it came with the headers: nothing to wait for
                return await response.read()
            with self._deadlines.within(target.settings.timeouts.idle):
                return await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(target, exc) from exc
        finally:
            # A whole body read (or a failed read) closed the response and freed its connection
            # already; releasing it again would only poison its drained stream (2-4 µs).
            if not response.closed:
                response.release()

    def _request_for(self, exchange: Exchange, target: Target) -> tuple[str, dict[str, str], bytes]:
        settings = target.settings
        upstream_model = self._upstream_model(exchange, target.name)
        headers = _forwarded_headers(exchange.headers, target)
        headers.update(settings.headers)
        headers["Content-Type"] = "application/json"
        headers["X-Request-Id"] = exchange.request_id
        if target.credential is not None:
            name, value = target.credential
            headers[name] = value
        if settings.kind == "azure":
            url = _azure_url(target, exchange.endpoint, upstream_model)
        else:
            url = target.base_url + PATHS[exchange.endpoint]
        return url, headers, _body_bytes(exchange, upstream_model)

    def _upstream_model(self, exchange: Exchange, provider: str) -> str:
        route = exchange.route
        assert route is not None  # noqa: S101 - checked by forward
        if provider == route.provider:
            return route.upstream_model
        return self._fallback_models.get(route.model, {}).get(provider, route.upstream_model)


def _body_bytes(exchange: Exchange, upstream_model: str) -> bytes:
    if exchange.body.get("model") == upstream_model:
        return orjson.dumps(exchange.body) if exchange.body_changed else exchange.raw_body
    return orjson.dumps({**exchange.body, "model": upstream_model})


def _azure_url(target: Target, endpoint: str, deployment: str) -> str:
    version = target.settings.api_version
    if endpoint == "responses":
        return f"{target.base_url}/openai/responses?api-version={version}"
    path = f"/openai/deployments/{deployment}{PATHS[endpoint]}"
    return f"{target.base_url}{path}?api-version={version}"


def _forwarded_headers(client_headers: Mapping[str, str], target: Target) -> dict[str, str]:
    """The client headers this provider receives: looked up by name (case-insensitively, as
    aiohttp's headers are), so the client's other headers are never even read."""
    headers = {}
    for name in target.forwarded:
        value = client_headers.get(name)
        if value is not None:
            headers[name] = value
    if target.forwarded_prefixes:
        for name, value in client_headers.items():
            if name.lower().startswith(target.forwarded_prefixes):
                headers[name] = value
    return headers


def _returned_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    return {
        ours: upstream[theirs] for theirs, ours in RETURNED_RESPONSE_HEADERS.items()
        if theirs in upstream
    }  # fmt: skip


def _failure(target: Target, exc: TimeoutError | aiohttp.ClientError) -> GatewayError:
    """A request that timed out (504) or could not be sent or read (502), counted."""
    if isinstance(exc, TimeoutError):
        return counted(target.name, "timeout", UpstreamTimeoutError(_timeout_message(target)))
    return counted(target.name, "connect", UpstreamError(_connect_message(target)))


def _status_error(
    response: aiohttp.ClientResponse, raw: bytes, headers: dict[str, str]
) -> UpstreamStatusError:
    body: Any
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        message = f"The provider answered with status {response.status} and no error details."
        body = {"error": {"message": message, "type": "upstream_error", "param": None,
                          "code": f"upstream_{response.status}"}}  # fmt: skip
    retry_after = response.headers.get("Retry-After")
    if retry_after:
        headers = {**headers, "Retry-After": retry_after}
    return UpstreamStatusError(response.status, body, headers=headers)


def _retry_delay(error: GatewayError, attempt: int, settings: ProviderSettings) -> float | None:
    """Seconds to wait before retrying, or None when this error must not be retried here."""
    retries = settings.retries
    backoff: float = min(retries.backoff_max, retries.backoff_initial * 2**attempt)
    backoff *= 0.5 + _RETRY_JITTER.random() / 2
    if not isinstance(error, UpstreamStatusError):
        return backoff
    if error.upstream_status not in retries.on_status:
        return None
    asked = _seconds(error.headers.get("Retry-After"))
    if asked is None:
        return backoff
    return asked if asked <= retries.backoff_max else None


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _connect_message(target: Target) -> str:
    return f"The provider {target.name!r} could not be reached. Try again later."


def _timeout_message(target: Target) -> str:
    return f"The provider {target.name!r} did not answer in time. Try again later."
