"""The `auth` section of the configuration: trusted JWT issuers, API keys, lockout.

Owns the options that decide who may call (issuers and their keys, claim paths, the key
store, per-tenant and per-role defaults, lockout after failures) and their cross-field
checks. Must not verify anything: `gateway.credentials` and `gateway.keystore` do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from gateway.config_base import Section

JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
     "EdDSA", "HS256", "HS384", "HS512"}
)  # fmt: skip
DEMO_HASH_KEY = "gateway-demo-hash-key-change-me"  # noqa: S105 - documented demo default


class ClaimPaths(Section):
    """Where each principal field is read from a token; the first path present wins.

    A path is a claim name, or dotted (`realm_access.roles`) to reach into nested objects.
    """

    subject: tuple[str, ...] = Field(("sub",), description="Claims naming the caller.")
    tenant: tuple[str, ...] = Field(("tid", "org_id", "tenant"), description="Tenant claims.")
    roles: tuple[str, ...] = Field(
        ("roles", "groups", "scope", "scp"), description="Role, group or scope claims."
    )
    models: tuple[str, ...] = Field(("models",), description="Allowed-model pattern claims.")
    tier: tuple[str, ...] = Field(("tier",), description="Rate-limit tier claims.")


class IssuerSettings(Section):
    """One trusted identity provider: its `iss`, audience, algorithms and keys."""

    issuer: str = Field(min_length=1, description="Expected `iss` claim.")
    audience: tuple[str, ...] = Field(min_length=1, description="Accepted `aud` values.")
    algorithms: tuple[str, ...] = Field(
        ("RS256",), min_length=1, description="Accepted `alg` values (never taken from the token)."
    )
    secret: SecretStr | None = Field(None, description="HMAC shared secret (use ${VAR}).")
    public_keys: dict[str, Path] = Field({}, description="PEM public key files by key id.")
    jwks_file: Path | None = Field(None, description="JWKS file with the public keys.")
    jwks_url: str | None = Field(None, description="JWKS URL fetched and cached.")
    jwks_cache_seconds: float = Field(300.0, gt=0, description="Seconds a fetched JWKS is fresh.")
    jwks_refresh_seconds: float = Field(
        30.0, ge=0, description="Least seconds between fetches (an unknown kid triggers one)."
    )
    jwks_timeout: float = Field(5.0, gt=0, description="Seconds allowed for one JWKS fetch.")
    required_claims: tuple[str, ...] = Field(("exp",), description="Claims a token must have.")
    leeway: float = Field(30.0, ge=0, le=300, description="Clock skew allowed, in seconds.")
    claims: ClaimPaths = ClaimPaths()

    @model_validator(mode="after")
    def _consistent(self) -> IssuerSettings:
        unknown = [a for a in self.algorithms if a not in JWT_ALGORITHMS]
        if unknown:
            raise ValueError(f"unsupported algorithms {unknown} (`none` is never accepted)")
        sources = [self.secret is not None, bool(self.public_keys), self.jwks_file is not None,
                   self.jwks_url is not None]  # fmt: skip
        if sum(sources) != 1:
            raise ValueError("give exactly one of secret, public_keys, jwks_file, jwks_url")
        hmac_algs = [a for a in self.algorithms if a.startswith("HS")]
        if self.secret is None and hmac_algs:
            raise ValueError("HMAC algorithms (HS*) are only accepted with a shared secret")
        if self.secret is not None and len(hmac_algs) != len(self.algorithms):
            raise ValueError("a shared secret only verifies HMAC algorithms (HS*)")
        if self.secret is not None and len(self.secret.get_secret_value().encode()) < 32:
            raise ValueError("the shared secret must be at least 32 bytes")
        if self.jwks_url is not None and not _safe_jwks_url(self.jwks_url):
            raise ValueError("jwks_url must be https:// (http:// only for loopback)")
        return self


def _safe_jwks_url(url: str) -> bool:
    if url.startswith("https://"):
        return True
    loopback = ("http://127.0.0.1", "http://localhost", "http://[::1]")
    return url.startswith(loopback)


class AccessDefaults(Section):
    """What a tenant or role may use when the key or token does not say."""

    models: tuple[str, ...] | None = Field(None, description="Allowed model glob patterns.")
    endpoints: tuple[str, ...] | None = Field(None, description="Allowed endpoint patterns.")


class KeyStoreSettings(Section):
    path: Path = Field(Path("var/keys.json"), description="Key file when no Redis is configured.")
    hash_key: SecretStr = Field(
        SecretStr(DEMO_HASH_KEY),
        description="HMAC key for stored key hashes (set ${GATEWAY_KEY_HASH_KEY} in production).",
    )
    cache_seconds: float = Field(
        2.0, gt=0, le=60, description="Longest a replica trusts a cached key lookup."
    )


class LockoutSettings(Section):
    threshold: int = Field(10, ge=0, description="Failures per address before lockout (0: off).")
    window_seconds: float = Field(60.0, gt=0, description="Window in which failures count.")
    cooldown_seconds: float = Field(300.0, gt=0, description="Seconds a locked address waits.")


class AuthSettings(Section):
    mode: Literal["required", "disabled"] = Field(
        "required", description="`disabled` lets anyone in (logged loudly at startup)."
    )
    issuers: tuple[IssuerSettings, ...] = Field((), description="Trusted JWT issuers.")
    max_token_bytes: int = Field(8000, ge=256, le=65536, description="Largest accepted token.")
    keys: KeyStoreSettings = KeyStoreSettings()
    admin_role: str = Field("gateway-admin", min_length=1, description="Role for /admin.")
    default_models: tuple[str, ...] = Field(("*",), description="Models allowed by default.")
    default_endpoints: tuple[str, ...] = Field(("*",), description="Endpoints allowed by default.")
    tenants: dict[str, AccessDefaults] = Field({}, description="Defaults per tenant.")
    roles: dict[str, AccessDefaults] = Field({}, description="Defaults per role.")
    lockout: LockoutSettings = LockoutSettings()

    @model_validator(mode="after")
    def _unique_issuers(self) -> AuthSettings:
        names = [i.issuer for i in self.issuers]
        if len(names) != len(set(names)):
            raise ValueError("issuer values must be unique")
        return self
