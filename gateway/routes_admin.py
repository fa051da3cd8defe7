"""The admin API: create, list, show, revoke and rotate gateway API keys over HTTP.

Owns `/admin/keys` and its AppKeys, the admin-role check, and one audit event per admin action
(who, what, which key; never a secret). Must not hold key logic (the key store does) nor
authenticate by itself (the pipeline's `Authenticate` stage does, lockout included).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from gateway.api_keys import KeySpec, KeyStore, parse_duration, parse_names
from gateway.audit import emit_security_event
from gateway.credentials import TokenVerifier
from gateway.errors import InvalidRequestError, PermissionDeniedError
from gateway.exchange import Principal
from gateway.routes import PIPELINE, Wrap, client_address, parse_json_object
from gateway.stages.authenticate import Authenticate

KEY_STORE = web.AppKey("key_store", KeyStore)
TOKEN_VERIFIER = web.AppKey("token_verifier", TokenVerifier)
DEFAULT_GRACE = "1h"
_LIST_FIELDS = ("roles", "models", "endpoints")


def add_admin_routes(app: web.Application, wrap: Wrap) -> None:
    app.router.add_post("/admin/keys", wrap(create_key))
    app.router.add_get("/admin/keys", wrap(list_keys))
    app.router.add_get("/admin/keys/{key_id}", wrap(show_key))
    app.router.add_delete("/admin/keys/{key_id}", wrap(revoke_key))
    app.router.add_post("/admin/keys/{key_id}/rotate", wrap(rotate_key))


async def create_key(request: web.Request) -> web.Response:
    actor, store = await _admin(request, "create")
    record, secret = await store.create(_spec(parse_json_object(await request.read())))
    _audit("admin_key_created", actor, record.id)
    return _json({"key": secret, **record.public(time.time())}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    actor, store = await _admin(request, "list")
    now = time.time()
    records = await store.list_keys()
    _audit("admin_keys_listed", actor, None)
    return _json({"object": "list", "data": [r.public(now) for r in records]})


async def show_key(request: web.Request) -> web.Response:
    actor, store = await _admin(request, "show")
    record = await store.get(request.match_info["key_id"])
    _audit("admin_key_shown", actor, record.id)
    return _json(record.public(time.time()))


async def revoke_key(request: web.Request) -> web.Response:
    actor, store = await _admin(request, "revoke")
    record = await store.revoke(request.match_info["key_id"])
    _audit("admin_key_revoked", actor, record.id)
    return _json(record.public(time.time()))


async def rotate_key(request: web.Request) -> web.Response:
    actor, store = await _admin(request, "rotate")
    body = parse_json_object(await request.read()) if request.can_read_body else {}
    grace = _duration(body.get("grace", DEFAULT_GRACE), "grace")
    record, secret = await store.rotate(request.match_info["key_id"], grace)
    _audit("admin_key_rotated", actor, record.id, grace_seconds=grace)
    return _json({"key": secret, **record.public(time.time())})


async def _admin(request: web.Request, action: str) -> tuple[Principal, KeyStore]:
    """The calling admin and the key store; 401 or 429 from authentication, 403 otherwise."""
    stage = next((s for s in request.app[PIPELINE].stages if isinstance(s, Authenticate)), None)
    store = request.app.get(KEY_STORE)
    if stage is None or store is None:
        raise PermissionDeniedError(
            "The admin API is off because authentication is disabled (auth.mode).",
            code="admin_disabled",
        )
    principal = await stage.identify(request.headers, client_address(request))
    if stage.admin_role not in principal.roles:
        emit_security_event(
            "admin_denied", category="iam", outcome="failure",
            fields={"gateway.action": action, "gateway.actor_key_id": principal.key_id,
                    "gateway.auth_method": principal.method},
        )  # fmt: skip
        raise PermissionDeniedError(
            f"The admin API needs the {stage.admin_role!r} role, which your credential lacks.",
            code="admin_role_required",
        )
    return principal, store


def _audit(event: str, actor: Principal, key_id: str | None, **fields: Any) -> None:
    """One chained security event per admin action: the actor by key id and method (never a
    plain subject, which the SOC could not pseudonymize here), the key acted on, never a secret."""
    emit_security_event(
        event, category="iam", outcome="success",
        fields={"gateway.actor_key_id": actor.key_id, "gateway.auth_method": actor.method,
                "gateway.target_key_id": key_id, **{f"gateway.{k}": v for k, v in fields.items()}},
    )  # fmt: skip


def _spec(body: dict[str, Any]) -> KeySpec:
    name = body.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 100:
        raise InvalidRequestError("'name' must be a string of 1 to 100 characters.", param="name")
    lists = {field: _names(body.get(field), field) for field in _LIST_FIELDS}
    expires = body.get("expires_in")
    return KeySpec(
        name=name, tenant=_text(body.get("tenant"), "tenant"), roles=lists["roles"] or (),
        models=lists["models"], endpoints=lists["endpoints"], tier=_text(body.get("tier"), "tier"),
        expires_in=_duration(expires, "expires_in") if expires is not None else None,
    )  # fmt: skip


def _names(value: Any, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_names(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidRequestError(f"'{field}' must be a list of strings.", param=field)


def _text(value: Any, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise InvalidRequestError(f"'{field}' must be a string.", param=field)


def _duration(value: Any, field: str) -> float:
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise InvalidRequestError(f"'{field}' is {exc}.", param=field) from exc


def _json(body: dict[str, Any], *, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body),
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )  # fmt: skip
