"""Wiring: the ordered stage list, the engines they use, and the aiohttp application.

Owns the one list that tells the story of a request, and the opening and closing of every
long-lived resource in `cleanup_ctx`. Must not hold request logic of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import metrics
from gateway.anomaly import AnomalyDetector, open_store
from gateway.api_keys import KeyStore
from gateway.audit import close_writer, open_writer
from gateway.audit_event import EventContext
from gateway.audit_privacy import Pseudonymizer
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.credentials import TokenVerifier
from gateway.demo import DemoControl, bound_port, start_demo
from gateway.errors import NotFoundError
from gateway.exchange import Exchange, JsonReply, Reply
from gateway.keystore import open_key_store
from gateway.limiter import Limiter
from gateway.log import get_logger
from gateway.middlewares import AUDIT_REFUSED, add_unknown_route, edge
from gateway.pipeline import Pipeline, Stage
from gateway.policies import PolicySet
from gateway.policy_store import PolicyStore
from gateway.redaction_rules import merged_redaction
from gateway.redactor import Redactor
from gateway.routes import (
    CATALOG,
    DRAINING,
    PIPELINE,
    READY_CHECKS,
    RENDER_METRICS,
    SETTINGS,
    add_routes,
)
from gateway.routes_admin import KEY_STORE, TOKEN_VERIFIER, add_admin_routes
from gateway.stages.audit_log import AuditLog, AuditTrail
from gateway.stages.authenticate import Authenticate
from gateway.stages.enforce_policy import AnalyzerFinder, EnforcePolicy
from gateway.stages.rate_limit import RateLimit
from gateway.stages.redact_prompt import RedactPrompt
from gateway.upstream import UpstreamClient

DEMO_CONTROLS = web.AppKey("demo_controls", dict[str, DemoControl])
DEMO_PORTS = web.AppKey("demo_ports", dict[str, int])
AUDIT_TRAIL = web.AppKey("audit_trail", AuditTrail)
LIMITER = web.AppKey("limiter", Limiter)
REDACTOR = web.AppKey("redactor", Redactor)
POLICY_STORE = web.AppKey("policy_store", PolicyStore)
log = get_logger("gateway.app")


def build_stages(
    settings: Settings,
    *,
    audit: AuditTrail | None = None,
    limiter: Limiter | None = None,
    keys: KeyStore | None = None,
    tokens: TokenVerifier | None = None,
    redactor: Redactor | None = None,
    policies: PolicyStore | None = None,
) -> list[Stage]:
    """The request's story, in order. Responses pass back through it in reverse."""
    stages: list[Stage | None] = [
        AuditLog(audit) if audit else None,
        _authenticate(settings, keys, tokens),
        RateLimit(limiter, settings.limits) if limiter else None,
        _redact_prompt(settings, redactor),
        _enforce_policy(settings, policies, redactor),
    ]
    return [stage for stage in stages if stage is not None]


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[CATALOG] = Catalog(settings)
    app[READY_CHECKS] = []
    app[DRAINING] = [False]
    app[RENDER_METRICS] = _metrics_renderer(settings)
    app[DEMO_CONTROLS] = {}
    app[DEMO_PORTS] = {}
    add_routes(app, edge)
    add_admin_routes(app, edge)
    add_unknown_route(app)
    app.cleanup_ctx.append(_demo_providers)
    app.cleanup_ctx.append(_audit)
    app.cleanup_ctx.append(_limiter)
    app.cleanup_ctx.append(_auth)
    app.cleanup_ctx.append(_redactor)
    app.cleanup_ctx.append(_policies)
    app.cleanup_ctx.append(_pipeline)
    return app


def _metrics_renderer(settings: Settings) -> Callable[[], bytes]:
    """This process's registry, or the sum over every worker's files under `serve --workers`."""
    directory = settings.server.metrics_multiprocess_dir
    if directory is None:
        return lambda: generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]

    def render() -> bytes:
        metrics.flush_shared()  # this worker's own counts are exact; others' lag an iteration
        return generate_latest(registry)

    return render


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


async def _audit(app: web.Application) -> AsyncIterator[None]:
    """Opens the audit writer and the anomaly detector (its background task and state)."""
    settings = app[SETTINGS]
    audit = settings.audit
    if not audit.enabled:
        yield
        return
    kinds = {name: provider.kind for name, provider in settings.providers.items()}
    context = EventContext(Pseudonymizer.from_settings(audit), kinds, audit.pseudonymize_tenant)
    trail = AuditTrail(open_writer(audit), context, None, audit.anomaly.injection_rule,
                       audit.anomaly.canary_rule)  # fmt: skip
    if audit.anomaly.enabled:
        trail.detector = AnomalyDetector(audit.anomaly, open_store(settings), trail.report_anomaly)
        trail.detector.start()
    app[AUDIT_TRAIL] = trail
    app[AUDIT_REFUSED] = trail.record
    yield
    if trail.detector is not None:
        await trail.detector.close()
    close_writer(trail.writer)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    """Opens the rate limiter (its Redis client, if any) and registers its readiness check."""
    settings = app[SETTINGS]
    if not settings.limits.enabled:
        yield
        return
    limiter = Limiter(settings.limits, settings.redis)
    app[LIMITER] = limiter
    app[READY_CHECKS].append(limiter.check_ready)
    yield
    await limiter.close()


def _authenticate(
    settings: Settings, keys: KeyStore | None, tokens: TokenVerifier | None
) -> Authenticate | None:
    """The stage when auth is required; never silently skipped for want of its engines."""
    if settings.auth.mode == "disabled":
        return None
    if keys is None or tokens is None:
        raise ValueError("auth.mode is required but the key store or token verifier is missing")
    return Authenticate(settings.auth, tokens=tokens, keys=keys)


async def _auth(app: web.Application) -> AsyncIterator[None]:
    """Opens the API key store and the JWT verifier (JWKS fetches), or warns that auth is off."""
    settings = app[SETTINGS]
    if settings.auth.mode == "disabled":
        log.warning("auth_disabled", detail="AUTHENTICATION IS DISABLED (auth.mode: disabled): "
                    "anyone who reaches this port can use every model; the Authenticate stage "
                    "and the admin API are off")  # fmt: skip
        yield
        return
    tokens = TokenVerifier(settings.auth)
    await tokens.start()
    keys = await open_key_store(settings)
    app[KEY_STORE], app[TOKEN_VERIFIER] = keys, tokens
    app[READY_CHECKS].append(keys.ready)
    yield
    await keys.close()
    await tokens.close()


def _redact_prompt(settings: Settings, redactor: Redactor | None) -> RedactPrompt | None:
    """The stage when redaction is enabled; never silently skipped for want of its engine."""
    if not settings.redaction.enabled:
        return None
    if redactor is None:
        raise ValueError("redaction is enabled but the redactor is missing")
    return RedactPrompt(redactor)


async def _redactor(app: web.Application) -> AsyncIterator[None]:
    """Starts the redaction workers (Presidio and the spaCy model) and their readiness check."""
    settings = app[SETTINGS]
    if not settings.redaction.enabled:
        yield
        return
    redactor = Redactor(settings.redaction)
    await redactor.open()
    app[REDACTOR] = redactor
    app[READY_CHECKS].append(redactor.ready)
    yield
    await redactor.close()


def _enforce_policy(
    settings: Settings, policies: PolicyStore | None, redactor: Redactor | None
) -> EnforcePolicy | None:
    if not settings.policies.enabled:
        return None
    if policies is None:
        raise ValueError("policies.enabled is true but the policy store is not open")
    finder = AnalyzerFinder(redactor) if redactor else None
    return EnforcePolicy(policies, settings.policies, finder=finder)


async def _policies(app: web.Application) -> AsyncIterator[None]:
    """Loads the policy directory (a bad one stops startup) and watches it for edits."""
    settings = app[SETTINGS]
    if not settings.policies.enabled:
        yield
        return
    redactor = app.get(REDACTOR)

    def hand_to_redactor(policies: PolicySet) -> None:
        if redactor is not None:
            sections = policies.redaction_sections()
            redactor.update_rules(merged_redaction(settings.redaction.rules, sections))

    store = PolicyStore(settings.policies, entities_available=redactor is not None,
                        on_change=hand_to_redactor)  # fmt: skip
    await store.open()
    app[POLICY_STORE] = store
    yield
    await store.close()


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    base_urls = {name: f"http://127.0.0.1:{port}/v1" for name, port in app[DEMO_PORTS].items()}
    upstream = UpstreamClient(settings, base_urls)
    catalog = app[CATALOG]

    def forward(exchange: Exchange) -> Awaitable[Reply]:
        # Returns the provider call itself, not a coroutine awaiting it: a frame fewer to
        # resume each time the provider's answer wakes the request.
        if exchange.endpoint == "models":
            return _ready(_models_reply(catalog, exchange))
        return upstream.forward(exchange)

    app[PIPELINE] = Pipeline(
        build_stages(settings, audit=app.get(AUDIT_TRAIL), limiter=app.get(LIMITER),
                     keys=app.get(KEY_STORE), tokens=app.get(TOKEN_VERIFIER),
                     redactor=app.get(REDACTOR), policies=app.get(POLICY_STORE)),
        forward,
    )  # fmt: skip
    yield
    await upstream.close()


async def _ready(reply: Reply) -> Reply:
    return reply


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
