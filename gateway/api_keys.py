"""Gateway-issued API keys: their format, their record, and what every store shares.

Owns the key format (`gwk_` plus 256 random bits), the `ApiKey` record and the `KeySpec` of a
new one, parsing of durations and name lists, judging a presented secret against a record
(revoked, expired, rotated with a grace period), the `KeyStore` contract, and `StoreBase`:
create, revoke and rotate over a backend's insert, update and find, with the HMAC-SHA256 of
each key as the only form ever stored. Must never log, return or store a key in clear; must
not do I/O (the stores in `gateway.keystore` and `gateway.keystore_redis` do).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from gateway.errors import CredentialError, InvalidRequestError, NotFoundError

PREFIX = "gwk_"
KEY_SHAPE = re.compile(r"^gwk_[A-Za-z0-9_-]{43}$")

Clock = Callable[[], float]


def looks_like_key(credential: str) -> bool:
    """Whether `credential` has the form of a gateway API key."""
    return KEY_SHAPE.match(credential) is not None


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `15m`, `1h`, `30d`, `2w` (a bare number is seconds); ValueError else."""
    match = _DURATION.match(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h, 30d, 2w)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_names(text: str) -> tuple[str, ...]:
    """`'gpt-4o*, fast'` as `('gpt-4o*', 'fast')`."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a new key grants; None means the tenant, role or global default applies."""

    name: str
    tenant: str | None = None
    roles: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None
    endpoints: tuple[str, ...] | None = None
    tier: str | None = None
    expires_in: float | None = None  # seconds from creation


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: what it grants, its lifetime, and the keyed hashes of its secrets."""

    id: str
    name: str
    created_at: float
    hash: str
    tenant: str | None = None
    roles: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None
    endpoints: tuple[str, ...] | None = None
    tier: str | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    previous_hash: str | None = None
    previous_until: float | None = None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def public(self, now: float) -> dict[str, Any]:
        """What `keys list` and the admin API show: everything but the hashes."""
        shown = {k: v for k, v in asdict(self).items() if k not in ("hash", "previous_hash")}
        return {"object": "api_key", **shown, "status": self.status(now)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> ApiKey:
        lists = {
            k: tuple(data[k]) for k in ("roles", "models", "endpoints") if data.get(k) is not None
        }
        return ApiKey(**{**data, **lists})


def judge(record: ApiKey | None, digest: str, now: float) -> ApiKey:
    """The record if `digest` is a live secret of it, else `CredentialError` saying why."""
    if record is None:
        raise CredentialError("The API key is not recognised.", reason="unknown_key")
    current = hmac.compare_digest(record.hash, digest)
    previous = record.previous_hash is not None and hmac.compare_digest(
        record.previous_hash, digest
    )
    if record.revoked_at is not None:
        raise CredentialError("The API key has been revoked.", reason="revoked")
    if record.expires_at is not None and now >= record.expires_at:
        raise CredentialError("The API key has expired; create a new one.", reason="expired")
    if current or (previous and now < (record.previous_until or 0.0)):
        return record
    raise CredentialError(
        "The API key was rotated and its grace period is over; use the new key.", reason="rotated"
    )


class KeyStore(Protocol):
    async def verify(self, secret: str) -> ApiKey: ...
    async def create(self, spec: KeySpec) -> tuple[ApiKey, str]: ...
    async def list_keys(self) -> list[ApiKey]: ...
    async def get(self, key_id: str) -> ApiKey: ...
    async def revoke(self, key_id: str) -> ApiKey: ...
    async def rotate(self, key_id: str, grace: float) -> tuple[ApiKey, str]: ...
    async def ready(self) -> str | None: ...
    async def close(self) -> None: ...


def not_found(key_id: str) -> NotFoundError:
    return NotFoundError(f"No API key has id {key_id!r}.", code="key_not_found")


class StoreBase:
    """Create, revoke and rotate in terms of each backend's `_insert`, `_update`, `_find`."""

    def __init__(self, hash_key: bytes, clock: Clock) -> None:
        self._hash_key = hash_key
        self._clock = clock

    def digest(self, secret: str) -> str:
        return hmac.new(self._hash_key, secret.encode(), hashlib.sha256).hexdigest()

    async def verify(self, secret: str) -> ApiKey:
        digest = self.digest(secret)
        return judge(await self._find(digest), digest, self._clock())

    async def create(self, spec: KeySpec) -> tuple[ApiKey, str]:
        secret, now = PREFIX + secrets.token_urlsafe(32), self._clock()
        expires = now + spec.expires_in if spec.expires_in is not None else None
        record = ApiKey(
            id="key_" + secrets.token_hex(8), name=spec.name, created_at=now,
            hash=self.digest(secret), tenant=spec.tenant, roles=spec.roles, models=spec.models,
            endpoints=spec.endpoints, tier=spec.tier, expires_at=expires,
        )  # fmt: skip
        await self._insert(record)
        return record, secret

    async def revoke(self, key_id: str) -> ApiKey:
        now = self._clock()
        return await self._update(
            key_id, lambda r: r if r.revoked_at else replace(r, revoked_at=now)
        )

    async def rotate(self, key_id: str, grace: float) -> tuple[ApiKey, str]:
        """A new secret for the key; the old one keeps working for `grace` seconds."""
        secret, now = PREFIX + secrets.token_urlsafe(32), self._clock()

        def rotated(record: ApiKey) -> ApiKey:
            if record.status(now) != "active":
                raise InvalidRequestError(f"The API key {key_id!r} is {record.status(now)}; "
                                          "only active keys can be rotated.")  # fmt: skip
            return replace(record, hash=self.digest(secret), previous_hash=record.hash,
                           previous_until=now + grace)  # fmt: skip

        return await self._update(key_id, rotated), secret

    async def get(self, key_id: str) -> ApiKey:
        for record in await self.list_keys():
            if record.id == key_id:
                return record
        raise not_found(key_id)

    async def list_keys(self) -> list[ApiKey]:
        raise NotImplementedError

    async def _insert(self, record: ApiKey) -> None:
        raise NotImplementedError

    async def _update(self, key_id: str, change: Callable[[ApiKey], ApiKey]) -> ApiKey:
        raise NotImplementedError

    async def _find(self, digest: str) -> ApiKey | None:
        raise NotImplementedError
