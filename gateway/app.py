"""Wiring: the ordered stage list, the engines they use, and the aiohttp application.

Owns the one list that tells the story of a request, and the opening and closing of every
long-lived resource in `cleanup_ctx`. Must not hold request logic of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import REGISTRY, generate_latest

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.demo import DemoControl, bound_port, start_demo
from gateway.errors import NotFoundError
from gateway.exchange import Exchange, JsonReply, Reply
from gateway.middlewares import record_metrics, render_errors, request_context
from gateway.pipeline import Pipeline, Stage
from gateway.routes import (
    CATALOG,
    DRAINING,
    PIPELINE,
    READY_CHECKS,
    RENDER_METRICS,
    SETTINGS,
    add_routes,
)
from gateway.upstream import UpstreamClient

DEMO_CONTROLS = web.AppKey("demo_controls", dict[str, DemoControl])
DEMO_PORTS = web.AppKey("demo_ports", dict[str, int])


def build_stages(settings: Settings) -> list[Stage]:
    """The request's story, in order. Responses pass back through it in reverse."""
    return []


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[request_context, record_metrics, render_errors],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[CATALOG] = Catalog(settings)
    app[READY_CHECKS] = []
    app[DRAINING] = [False]
    app[RENDER_METRICS] = lambda: generate_latest(REGISTRY)
    app[DEMO_CONTROLS] = {}
    app[DEMO_PORTS] = {}
    add_routes(app)
    app.cleanup_ctx.append(_demo_providers)
    app.cleanup_ctx.append(_pipeline)
    return app


async def _demo_providers(app: web.Application) -> AsyncIterator[None]:
    """Starts an in-process demo provider on a loopback port for each `kind: demo` provider."""
    runners = []
    for name, provider in app[SETTINGS].providers.items():
        if provider.kind == "demo":
            control = DemoControl(settings=provider.demo)
            runner = await start_demo("127.0.0.1", 0, control)
            runners.append(runner)
            app[DEMO_CONTROLS][name] = control
            app[DEMO_PORTS][name] = bound_port(runner)
    yield
    for runner in runners:
        await runner.cleanup()


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    base_urls = {name: f"http://127.0.0.1:{port}/v1" for name, port in app[DEMO_PORTS].items()}
    upstream = UpstreamClient(settings, base_urls)
    catalog = app[CATALOG]

    async def forward(exchange: Exchange) -> Reply:
        if exchange.endpoint == "models":
            return _models_reply(catalog, exchange)
        return await upstream.forward(exchange)

    app[PIPELINE] = Pipeline(build_stages(settings), forward)
    yield
    await upstream.close()


def _models_reply(catalog: Catalog, exchange: Exchange) -> Reply:
    if exchange.model is None:
        return JsonReply(200, {}, b"", catalog.listing(exchange.principal))
    allowed = catalog.listing(exchange.principal)["data"]
    for item in allowed:
        if item["id"] == exchange.model:
            return JsonReply(200, {}, b"", item)
    raise NotFoundError(
        f"The model {exchange.model!r} does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )
