"""The HTTP surface: OpenAI endpoints, ops endpoints, and how replies are written.

Owns request parsing and validation into an `Exchange`, the AppKeys handlers read, writing
JSON and SSE replies (with one SSE error event if a stream fails), `/healthz`, `/readyz` and
`/metrics`. Must not hold business rules: those are stages.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import metrics
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.errors import GatewayError, InvalidRequestError
from gateway.event_json import json_event
from gateway.exchange import Exchange, JsonReply, Reply, StreamReply
from gateway.log import get_logger
from gateway.pipeline import Pipeline

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Wrap = Callable[[Handler], Handler]
"""Puts a handler behind the HTTP edge (`middlewares.edge`)."""
ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns None when a dependency is fine, else a short reason."""

SETTINGS = web.AppKey("settings", Settings)
PIPELINE = web.AppKey("pipeline", Pipeline)
CATALOG = web.AppKey("catalog", Catalog)
READY_CHECKS = web.AppKey("ready_checks", list[ReadyCheck])
DRAINING = web.AppKey("draining", list[bool])
RENDER_METRICS: web.AppKey[Callable[[], bytes]] = web.AppKey("render_metrics")
EXCHANGE = web.RequestKey("exchange", Exchange)
REQUEST_ID = web.RequestKey("request_id", str)

PROXY_ENDPOINTS = {
    "/v1/chat/completions": "chat.completions",
    "/v1/responses": "responses",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
_REQUIRED_FIELDS = {
    "chat.completions": "messages",
    "completions": "prompt",
    "embeddings": "input",
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = get_logger("gateway.routes")


def add_routes(app: web.Application, wrap: Wrap) -> None:
    for path in PROXY_ENDPOINTS:
        app.router.add_post(path, wrap(proxy))
    app.router.add_get("/v1/models", wrap(list_models))
    app.router.add_get("/v1/models/{model}", wrap(get_model))
    app.router.add_get("/healthz", wrap(healthz))
    app.router.add_get("/readyz", wrap(readyz))
    app.router.add_get("/metrics", wrap(metrics_endpoint))


def request_id_of(request: web.Request) -> str:
    """The request's id: the client's `x-request-id` when well formed, else a new one."""
    given = request.headers.get("x-request-id")
    if given and _REQUEST_ID.match(given):
        return given
    # 128 random bits from the process's seeded generator: unique, and no system call per
    # request. A request id is a label for logs, not a secret. Bytes to hex, not an int
    # formatted as 32 hex digits: the same form, at half the cost.
    return "req_" + random.randbytes(16).hex()  # noqa: S311 - not a secret (above)


async def proxy(request: web.Request) -> web.StreamResponse:
    endpoint = PROXY_ENDPOINTS[request.path]
    raw = await request.read()
    body = parse_json_object(raw)
    _validate(endpoint, body)
    exchange = _new_exchange(request, endpoint, raw, body)
    exchange.model = body["model"]
    exchange.route = request.app[CATALOG].resolve(exchange.model)
    exchange.is_stream = body.get("stream") is True
    exchange.client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    written: list[web.StreamResponse] = []  # `_answered`, inline on the proxied requests' path
    await _run(request, exchange, written)
    return written[0]


async def list_models(request: web.Request) -> web.StreamResponse:
    return await _answered(request, _new_exchange(request, "models", b"", {}))


async def get_model(request: web.Request) -> web.StreamResponse:
    exchange = _new_exchange(request, "models", b"", {})
    exchange.model = request.match_info["model"]
    return await _answered(request, exchange)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAINING][0]:
        return web.json_response({"status": "draining"}, status=503)
    problems = [p for p in [await check() for check in request.app[READY_CHECKS]] if p]
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[RENDER_METRICS]()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _new_exchange(
    request: web.Request, endpoint: str, raw: bytes, body: dict[str, Any]
) -> Exchange:
    exchange = Exchange(
        request_id=request[REQUEST_ID],
        endpoint=endpoint,
        method=request.method,
        path=request.path,
        headers=request.headers,
        client_address=client_address(request),
        raw_body=raw,
        body=body,
    )
    request[EXCHANGE] = exchange
    return exchange


def refused_exchange(request: web.Request) -> Exchange:
    """The request's exchange, or a bare one for a request refused before it had one."""
    if EXCHANGE in request:
        return request[EXCHANGE]
    return Exchange(
        request_id=request.get(REQUEST_ID, "unknown"),
        endpoint=PROXY_ENDPOINTS.get(request.path, "other"),
        method=request.method,
        path=request.path,
        headers=request.headers,
        client_address=client_address(request),
    )


def client_address(request: web.Request) -> str:
    """The caller's address: the first X-Forwarded-For hop when configured to trust it."""
    if request.app[SETTINGS].server.trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.remote or ""


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or `InvalidRequestError` (400) saying how to send one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. Send a JSON object with "
            "Content-Type: application/json.",
            code="invalid_json",
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return body


def _validate(endpoint: str, body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be true or false.", param="stream")
    required = _REQUIRED_FIELDS.get(endpoint)
    if required and required not in body:
        raise InvalidRequestError(f"Missing required parameter: '{required}'.", param=required)
    if endpoint == "chat.completions" and not (
        isinstance(body["messages"], list) and body["messages"]
    ):
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
    if endpoint == "responses" and "input" not in body and "previous_response_id" not in body:
        raise InvalidRequestError("Missing required parameter: 'input'.", param="input")


async def _answered(request: web.Request, exchange: Exchange) -> web.StreamResponse:
    """The response the pipeline's run of `exchange` writes."""
    written: list[web.StreamResponse] = []
    await _run(request, exchange, written)
    return written[0]


def _run(
    request: web.Request, exchange: Exchange, written: list[web.StreamResponse]
) -> Awaitable[None]:
    """The pipeline's run of `exchange`, which appends the response to `written` (once
    awaited). The handler awaits the run itself: a coroutine here would be one more frame to
    resume each time the provider's answer wakes the request."""

    def respond(reply: Reply) -> Awaitable[None] | None:
        if isinstance(reply, StreamReply):
            return _write_stream(request, exchange, reply, written)
        written.append(_json_response(exchange, reply))
        return None

    return request.app[PIPELINE].run(exchange, respond)


def _reply_headers(exchange: Exchange, upstream: dict[str, str]) -> dict[str, str]:
    """The provider's headers we return, then the stages' (`x-request-id` is `http_edge`'s
    for an answer returned to it, and a stream's own: it is sent before `http_edge` sees it)."""
    return {**upstream, **exchange.response_headers}


def _json_response(exchange: Exchange, reply: JsonReply) -> web.Response:
    body = orjson.dumps(reply.body) if reply.body is not None else reply.raw
    headers = _reply_headers(exchange, reply.headers)
    headers["Content-Type"] = "application/json"
    return web.Response(status=reply.status, body=body, headers=headers)


async def _write_stream(
    request: web.Request, exchange: Exchange, reply: StreamReply, written: list[web.StreamResponse]
) -> None:
    headers = _reply_headers(exchange, reply.headers)
    headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no", "x-request-id": exchange.request_id})  # fmt: skip
    response = web.StreamResponse(status=reply.status, headers=headers)
    await response.prepare(request)
    written.append(response)
    timings = exchange.timings
    try:
        if reply.whole_events is not None:  # no stage reads the events: pass the bytes on
            async for piece in reply.whole_events:
                await response.write(piece)
                if not timings.first_written:
                    _first_written(exchange)
        else:
            async for event in reply.events:
                await response.write(event.encode())
                if not timings.first_written:
                    _first_written(exchange)
    except GatewayError as error:
        await _write_stream_error(response, exchange, error)
    finally:
        await reply.close()
    await response.write_eof()


def _first_written(exchange: Exchange) -> None:
    timings = exchange.timings
    timings.first_written = time.perf_counter()
    metrics.observer(metrics.FIRST_CHUNK_SECONDS, exchange.endpoint)(
        timings.first_written - timings.started
    )


async def _write_stream_error(
    response: web.StreamResponse, exchange: Exchange, error: GatewayError
) -> None:
    """Ends a started stream with one error event the openai SDK raises as `APIError`."""
    exchange.error_code = error.error_code
    log.warning("stream_failed", code=error.error_code, error_type=error.type)
    payload = error.body()
    if exchange.endpoint == "responses":
        detail = payload["error"]
        payload = {"type": "error", "code": detail.get("code"), "message": detail.get("message"),
                   "param": detail.get("param"), **payload}  # fmt: skip
        await response.write(json_event(payload, event="error").encode())
        return
    await response.write(json_event(payload).encode())
