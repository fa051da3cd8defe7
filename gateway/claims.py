"""The identity a verified token grants: its claims read through the configured paths.

Owns `Claimed` and mapping claims to it: a path is a claim name (URL-style names included) or
a dotted path into nested objects, the first present wins, and roles or models may be a list
or a space- or comma-separated string (OAuth `scope`). Must not verify tokens
(`gateway.credentials` does) nor decide what a caller may use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config_auth import ClaimPaths
from gateway.errors import CredentialError


@dataclass(frozen=True, slots=True)
class Claimed:
    """Who a verified token says the caller is; `models` is None when the token is silent."""

    subject: str
    issuer: str
    tenant: str | None = None
    roles: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None
    tier: str | None = None


def claimed_from(claims: Mapping[str, Any], paths: ClaimPaths, issuer: str) -> Claimed:
    """Maps verified claims to an identity through the configured claim paths."""
    subject = _text(_first(claims, paths.subject))
    if subject is None:
        raise CredentialError(
            "The token names no subject (sub).", reason="no_subject", code="invalid_token"
        )
    models = _first(claims, paths.models)
    return Claimed(
        subject=subject,
        issuer=issuer,
        tenant=_text(_first(claims, paths.tenant)),
        roles=_names(_first(claims, paths.roles)),
        models=_names(models) if models is not None else None,
        tier=_text(_first(claims, paths.tier)),
    )


def _first(claims: Mapping[str, Any], paths: tuple[str, ...]) -> Any:
    for path in paths:
        value = _lookup(claims, path)
        if value is not None:
            return value
    return None


def _lookup(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by exact name (URL-style names included), else by dotted path."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value) or None


def _names(value: Any) -> tuple[str, ...]:
    """A list of strings, or a space- or comma-separated string (OAuth `scope`)."""
    if isinstance(value, str):
        return tuple(n for n in re.split(r"[\s,]+", value) if n)
    if isinstance(value, list):
        return tuple(str(n) for n in value if isinstance(n, str | int))
    return ()
