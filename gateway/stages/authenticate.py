"""Authenticate: establish who is calling, then whether they may use this endpoint and model.

Owns reading the credential headers (`Authorization: Bearer`, `api-key`, `x-api-key`), telling
a gateway API key from a JWT by its form, turning either into a `Principal` with the tenant,
role and global defaults applied, per-address failure counting with a lockout, and one
`auth_failed` security event per failure. Must never log, echo or forward the credential.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.api_keys import ApiKey, KeyStore, looks_like_key
from gateway.audit import emit_security_event
from gateway.catalog import model_allowed
from gateway.claims import Claimed
from gateway.config_auth import AuthSettings, LockoutSettings
from gateway.credentials import TokenVerifier, looks_like_jwt
from gateway.errors import AuthLockoutError, CredentialError, PermissionDeniedError
from gateway.exchange import Exchange, Principal
from gateway.log import get_logger
from gateway.pipeline import Stage

CREDENTIAL_HEADERS = ("api-key", "x-api-key")
_NO_OTHERS = (None, None)  # one per CREDENTIAL_HEADERS
_MAX_TRACKED = 100_000
_MAX_PRINCIPALS = 10_000
security = get_logger("gateway.security")


def truncated_address(address: str) -> str:
    """The client's network, not its host: /24 for IPv4, /48 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unknown"
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass(slots=True)
class _Tally:
    failures: int
    since: float
    locked_until: float = 0.0


class FailureCounter:
    """Failed authentications per source address; past the threshold within the window, the
    address is locked out for the cool-down. Counts are per process (per replica)."""

    def __init__(self, settings: LockoutSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._tallies: OrderedDict[str, _Tally] = OrderedDict()

    def locked_for(self, address: str) -> float:
        """Seconds the address must still wait; 0 when it may try."""
        tally = self._tallies.get(address)
        return max(0.0, tally.locked_until - self._clock()) if tally else 0.0

    def failed(self, address: str) -> bool:
        """Counts one failure; True when this one locks the address out."""
        if self._settings.threshold == 0:
            return False
        now = self._clock()
        tally = self._tallies.get(address)
        if tally is None or now - tally.since > self._settings.window_seconds:
            tally = _Tally(0, now)
        tally.failures += 1
        self._tallies[address] = tally
        self._tallies.move_to_end(address)
        if len(self._tallies) > _MAX_TRACKED:
            self._tallies.popitem(last=False)
        if tally.failures < self._settings.threshold:
            return False
        tally.locked_until = now + self._settings.cooldown_seconds
        tally.failures, tally.since = 0, now
        return True


def credential_from(headers: Mapping[str, str]) -> str:
    """The one credential the request carries, or `CredentialError` (missing, malformed,
    or two different credentials in different headers)."""
    authorization = headers.get("Authorization")
    others = (headers.get(CREDENTIAL_HEADERS[0]), headers.get(CREDENTIAL_HEADERS[1]))
    if authorization is not None and others == _NO_OTHERS:  # the usual case: nothing to compare
        return _bearer(authorization)
    found = [] if authorization is None else [_bearer(authorization)]
    found += [value.strip() for value in others if value is not None]
    if not found:
        raise CredentialError(
            "No credential was sent. Send your gateway API key or token as "
            "'Authorization: Bearer <credential>' (or in an 'api-key' header).",
            reason="missing", code="missing_credential",
        )  # fmt: skip
    if len(found) == 1:
        return found[0]
    first = found[0].encode("utf-8", "surrogateescape")
    if any(not hmac.compare_digest(first, o.encode("utf-8", "surrogateescape")) for o in found):
        raise CredentialError("The request carries two different credentials; send one.",
                              reason="conflicting")  # fmt: skip
    return found[0]


def _bearer(authorization: str) -> str:
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise CredentialError("The Authorization header must be 'Bearer <credential>'.",
                              reason="malformed_header")  # fmt: skip
    return value


class Authenticate(Stage):
    """Sets `exchange.principal` from an API key or a JWT, and refuses what it may not use."""

    name = "authenticate"

    def __init__(
        self, settings: AuthSettings, *, tokens: TokenVerifier, keys: KeyStore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._settings = settings
        self._tokens = tokens
        self._keys = keys
        self._failures = FailureCounter(settings.lockout, clock)
        # A token's identity comes from the verifier's cache on most requests; the principal
        # built from it (access lists resolved) is remembered too, one per equal identity.
        # Settings never change here. `_recalled` finds it first by the identity object's
        # `id` (the verifier hands back the same object on every recall): hashing the
        # dataclass is a Python `__hash__` over its fields, ~3k instructions a request. Its
        # entry holds the object, so the id is not reused while the entry lives.
        self._principals: dict[Claimed, Principal] = {}
        self._recalled: dict[int, tuple[Claimed, Principal]] = {}

    @property
    def admin_role(self) -> str:
        return self._settings.admin_role

    async def on_request(self, exchange: Exchange) -> None:
        principal = await self.identify(exchange.headers, exchange.client_address)
        exchange.principal = principal
        authorize(principal, exchange)

    async def identify(self, headers: Mapping[str, str], address: str) -> Principal:
        """Who the credential in `headers` belongs to; failures count against `address`."""
        wait = self._failures.locked_for(address)
        if wait:
            raise AuthLockoutError(
                "Too many failed authentications from your address; try again later.",
                retry_after=wait,
            )
        try:
            credential = credential_from(headers)
            # A token verified moments ago passed every check then: no coroutine, no form test.
            claimed = self._tokens.recalled(credential)
            if claimed is not None:
                return self._from_claims(claimed)
            return await self._principal(credential)
        except CredentialError as error:
            self._failed(address, error.reason)
            raise

    async def _principal(self, credential: str) -> Principal:
        if looks_like_key(credential):
            return self._from_key(await self._keys.verify(credential))
        if looks_like_jwt(credential):
            return self._from_claims(await self._tokens.verify(credential))
        raise CredentialError(
            "The credential is malformed: it is neither a gateway API key (gwk_...) nor a JWT.",
            reason="malformed",
        )

    def _failed(self, address: str, reason: str) -> None:
        source = truncated_address(address)
        security.warning("auth_failed", reason=reason, source=source)
        emit_security_event("auth_failed", category="authentication", outcome="failure",
                            fields={"source.address": address, "event.reason": reason})  # fmt: skip
        if self._failures.failed(address):
            security.warning("auth_lockout", source=source,
                             seconds=self._settings.lockout.cooldown_seconds)  # fmt: skip
            emit_security_event(
                "auth_lockout", category="authentication", outcome="failure",
                fields={"source.address": address,
                        "gateway.cooldown_seconds": self._settings.lockout.cooldown_seconds},
            )  # fmt: skip

    def _from_key(self, key: ApiKey) -> Principal:
        return Principal(
            subject=key.name, tenant=key.tenant, roles=key.roles,
            models=self._access("models", key.models, key.tenant, key.roles),
            endpoints=self._access("endpoints", key.endpoints, key.tenant, key.roles),
            tier=key.tier, key_id=key.id, method="api_key",
        )  # fmt: skip

    def _from_claims(self, claimed: Claimed) -> Principal:
        found = self._recalled.get(id(claimed))
        if found is not None and found[0] is claimed:
            return found[1]
        if len(self._principals) >= _MAX_PRINCIPALS or len(self._recalled) >= _MAX_PRINCIPALS:
            self._principals.clear()
            self._recalled.clear()
        principal = self._principals.get(claimed)
        if principal is None:
            principal = self._principals[claimed] = self._principal_of(claimed)
        self._recalled[id(claimed)] = (claimed, principal)
        return principal

    def _principal_of(self, claimed: Claimed) -> Principal:
        return Principal(
            subject=claimed.subject, tenant=claimed.tenant, roles=claimed.roles,
            models=self._access("models", claimed.models, claimed.tenant, claimed.roles),
            endpoints=self._access("endpoints", None, claimed.tenant, claimed.roles),
            tier=claimed.tier, method="jwt",
        )  # fmt: skip

    def _access(
        self, field: str, given: tuple[str, ...] | None, tenant: str | None, roles: tuple[str, ...]
    ) -> tuple[str, ...]:
        """The credential's own list, else its tenant's, else its roles' (merged), else the
        global default."""
        if given is not None:
            return given
        settings = self._settings
        if tenant in settings.tenants:
            from_tenant = getattr(settings.tenants[tenant], field)
            if from_tenant is not None:
                return tuple(from_tenant)
        lists = [getattr(settings.roles[r], field) for r in roles if r in settings.roles]
        merged = tuple(dict.fromkeys(p for found in lists if found is not None for p in found))
        if any(found is not None for found in lists):
            return merged
        return settings.default_models if field == "models" else settings.default_endpoints


def authorize(principal: Principal, exchange: Exchange) -> None:
    """Refuses an endpoint or model the principal may not use (403)."""
    endpoints = principal.endpoints
    if "*" not in endpoints and not any(fnmatchcase(exchange.endpoint, p) for p in endpoints):
        security.info("auth_denied", reason="endpoint_not_allowed", subject=principal.subject,
                      endpoint=exchange.endpoint)  # fmt: skip
        raise PermissionDeniedError(
            f"Your credential may not use the {exchange.endpoint} endpoint.",
            code="endpoint_not_allowed",
        )
    if exchange.endpoint == "models" or exchange.model is None:
        return  # the listing itself is filtered by the catalog
    if not model_allowed(principal, exchange.model):
        security.info("auth_denied", reason="model_not_allowed", subject=principal.subject)
        raise PermissionDeniedError(
            f"Your credential may not use the model {exchange.model!r}.",
            param="model", code="model_not_allowed",
        )  # fmt: skip
