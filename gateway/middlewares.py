"""HTTP concerns around every handler: request id and log context, HTTP metrics, error rendering.

Owns turning any failure into OpenAI's error shape in one place, and the catch-all route that
answers unknown paths and methods with it. Must not read or change request or response
bodies, nor streams.

`http_edge` wraps each route's handler (`edge`) rather than being an aiohttp middleware: with
any middleware, aiohttp also runs one of its own per request (and looks up the cached chain),
and a streaming response resumes every coroutine between the task and the stream's reader for
each event it writes, so each layer is paid per event. A route without `edge` has no error
rendering, metrics or request id.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import orjson
import structlog
from aiohttp import web

from gateway import metrics
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    status_of,
)
from gateway.exchange import Exchange
from gateway.log import get_logger
from gateway.routes import (
    CATALOG,
    EXCHANGE,
    REQUEST_ID,
    Handler,
    refused_exchange,
    request_id_of,
)

AUDIT_REFUSED: web.AppKey[Callable[[Exchange], None]] = web.AppKey("audit_refused")
"""Records the audit event of a request refused before the pipeline (bad JSON, 404, 413...)."""
log = get_logger("gateway.http")
_ENTERED = metrics.incrementer(metrics.IN_FLIGHT)


UNKNOWN_ROUTE = "unknown"


def edge(handler: Handler) -> Handler:
    """`handler` behind `http_edge`: the route's handler is `http_edge` itself, so the edge
    adds no coroutine of its own."""
    return functools.partial(http_edge, handler=handler)


def add_unknown_route(app: web.Application) -> None:
    """Every path and method no other route serves (add it last): 404, or 405 when the path
    is served with other methods."""
    app.router.add_route("*", "/{tail:.*}", edge(_unknown), name=UNKNOWN_ROUTE)


async def _unknown(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.name != UNKNOWN_ROUTE:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise MethodNotAllowedError(
            f"Method {request.method} is not allowed on this path.",
            headers={"Allow": ", ".join(sorted(allowed))},
        )
    raise NotFoundError("Unknown request URL. This gateway serves the OpenAI API under /v1/.")


async def http_edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request's edge: assigns the request id (bound to every log line, returned as a
    header), counts the request by route, model and status, tracks in-flight and overhead,
    and is the one place errors become responses: the client never sees a traceback.

    One wrapper, not three (and the route's handler itself: see the module docstring): a
    streaming response resumes every coroutine between the task and the stream's reader for
    each event it writes, so each layer is paid per event.
    """
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    # aiohttp runs every request in a task of its own, started with a copy of the
    # connection's context, so nothing bound here outlives the request: no clearing needed.
    structlog.contextvars.bind_contextvars(request_id=request_id)
    _ENTERED(1)
    status = 500  # what a request that never gets a response (cancelled) is counted as
    try:
        try:
            response = await handler(request)
        except GatewayError as error:
            response = _rejected(request, error)
        except web.HTTPException as exc:
            response = _rejected(request, _translate_http(exc))
        except Exception:
            log.exception("unhandled_error", path=request.path)
            failure = InternalError(
                f"The gateway failed to handle this request (request id {request_id})."
            )
            _audit_refused(request, failure)
            response = _error_response(failure)
        status = response.status
    finally:
        _ENTERED(-1)
        _observe(request, status)
    if not response.prepared:
        response.headers["x-request-id"] = request_id
    return response


def _observe(request: web.Request, status: int) -> None:
    exchange = request.get(EXCHANGE)
    if exchange is None:
        route = "unmatched" if request.match_info.route.name == UNKNOWN_ROUTE else "ops"
        metrics.incrementer(metrics.REQUESTS, route, "", str(status))(1)
        return
    exchange.timings.finished = time.perf_counter()
    model = exchange.model
    if model is None:
        model = ""
    elif exchange.route is None and request.app[CATALOG].resolve(model) is None:
        model = "other"  # a label takes configured model names only; routed ones are
    status_label = str(exchange.status or status)
    metrics.incrementer(metrics.REQUESTS, exchange.endpoint, model, status_label)(1)
    if exchange.status < 400:
        overhead = exchange.timings.overhead()
        metrics.observer(metrics.OVERHEAD_SECONDS, exchange.endpoint)(overhead)


def _rejected(request: web.Request, error: GatewayError) -> web.Response:
    log.info("request_rejected", method=request.method, path=request.path,
             status=status_of(error), code=error.error_code)  # fmt: skip
    _audit_refused(request, error)
    return _error_response(error)


def _audit_refused(request: web.Request, error: GatewayError) -> None:
    """Audits a request the pipeline never saw; the pipeline's own requests set a status."""
    record = request.app.get(AUDIT_REFUSED)
    exchange = refused_exchange(request)
    if record is None or exchange.status:
        return
    exchange.status = status_of(error)
    exchange.error_code = error.error_code
    record(exchange)


def _translate_http(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLargeError(
            "The request body is larger than this gateway accepts. Send a smaller request."
        )
    return InvalidRequestError(exc.reason or "The request could not be handled.")


def _error_response(error: GatewayError) -> web.Response:
    headers = {**error.headers, "Content-Type": "application/json"}
    return web.Response(status=status_of(error), body=orjson.dumps(error.body()), headers=headers)
