"""Gateway-issued API keys: minting, keyed hashes, and the file and Redis stores that hold them.

Owns the key format (`gwk_` plus 256 random bits), the HMAC-SHA256 of each key (the only form
ever stored), create / list / revoke / rotate with a grace period, expiry, and the brief
in-process lookup cache. With Redis, every replica shares the keys and a change is published
on a channel that clears every replica's cache at once; if that channel is down a cached lookup
is still trusted for at most `auth.keys.cache_seconds`. Owns the Redis client of the key store
and translates its errors here. Must never log, return or store a key in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from gateway.config import RedisSettings, Settings
from gateway.config_auth import DEMO_HASH_KEY
from gateway.config_load import ConfigError
from gateway.errors import (
    CredentialError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from gateway.log import get_logger
from gateway.redis_client import open_redis

PREFIX = "gwk_"
KEY_SHAPE = re.compile(r"^gwk_[A-Za-z0-9_-]{43}$")
_NS = "gateway:keys:"
CHANNEL = _NS + "changed"
_CACHE_LIMIT = 10_000

Clock = Callable[[], float]
log = get_logger("gateway.keystore")


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


async def open_key_store(settings: Settings, *, clock: Clock = time.time) -> KeyStore:
    """The store the config names: Redis when `redis.url` is set, else the key file."""
    keys = settings.auth.keys
    hash_key = keys.hash_key.get_secret_value().encode()
    if hash_key == DEMO_HASH_KEY.encode():
        log.warning("key_hash_key_default", detail="auth.keys.hash_key is the documented demo "
                    "default; set it from ${GATEWAY_KEY_HASH_KEY} in production")  # fmt: skip
    store: FileKeyStore | RedisKeyStore
    if settings.redis.url is not None or settings.redis.sentinels:
        store = RedisKeyStore(settings.redis, hash_key, keys.cache_seconds, clock)
    else:
        store = FileKeyStore(keys.path, hash_key, keys.cache_seconds, clock)
    await store.start()
    return store


def not_found(key_id: str) -> NotFoundError:
    return NotFoundError(f"No API key has id {key_id!r}.", code="key_not_found")


class _Store:
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


_UNKNOWN_RECHECK = 0.2


class FileKeyStore(_Store):
    """Keys in one JSON file (mode 0600), read into memory and re-read when it changes, so
    keys made with `gateway keys` reach a running gateway within `cache_seconds`."""

    def __init__(self, path: Path, hash_key: bytes, cache_seconds: float, clock: Clock) -> None:
        super().__init__(hash_key, clock)
        self._path = path
        self._cache_seconds = cache_seconds
        self._records: dict[str, ApiKey] = {}
        self._by_hash: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0

    async def start(self) -> None:
        await self._reload()

    async def close(self) -> None:
        """Nothing to release: the file is only open while read or written."""

    async def ready(self) -> str | None:
        return None

    async def list_keys(self) -> list[ApiKey]:
        await self._reload()
        return sorted(self._records.values(), key=lambda r: r.created_at)

    async def _find(self, digest: str) -> ApiKey | None:
        # A key the cache does not know may have just been made with `gateway keys create`:
        # look at the file again at once, but at most every _UNKNOWN_RECHECK seconds, so a
        # flood of bad keys costs a few stat calls, not a read each.
        age = time.monotonic() - self._checked_at
        unknown = digest not in self._by_hash
        if age >= self._cache_seconds or (unknown and age >= _UNKNOWN_RECHECK):
            await self._reload()
        return self._records.get(self._by_hash.get(digest, ""))

    async def _insert(self, record: ApiKey) -> None:
        def insert(records: dict[str, ApiKey]) -> ApiKey:
            records[record.id] = record
            return record

        await self._change(insert)

    async def _update(self, key_id: str, change: Callable[[ApiKey], ApiKey]) -> ApiKey:
        def update(records: dict[str, ApiKey]) -> ApiKey:
            if key_id not in records:
                raise not_found(key_id)
            records[key_id] = change(records[key_id])
            return records[key_id]

        return await self._change(update)

    async def _change(self, change: Callable[[dict[str, ApiKey]], ApiKey]) -> ApiKey:
        records, changed = await asyncio.to_thread(self._change_locked, change)
        self._remember(records, self._stat())
        return changed

    def _change_locked(
        self, change: Callable[[dict[str, ApiKey]], ApiKey]
    ) -> tuple[dict[str, ApiKey], ApiKey]:
        """Read, change and atomically replace the file under an exclusive lock."""
        with self._locked():
            records = self._read()
            changed = change(records)
            document = {"version": 1, "keys": [r.to_json() for r in records.values()]}
            temporary = self._path.with_name(self._path.name + ".tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self._path)
            return records, changed

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self._path.with_name(self._path.name + ".lock")
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    async def _reload(self) -> None:
        self._checked_at = time.monotonic()
        stamp = await asyncio.to_thread(self._stat)
        if stamp != self._stamp:
            self._remember(await asyncio.to_thread(self._read), stamp)

    def _remember(self, records: dict[str, ApiKey], stamp: tuple[int, int, int] | None) -> None:
        by_hash = {r.hash: r.id for r in records.values()}
        by_hash.update({r.previous_hash: r.id for r in records.values() if r.previous_hash})
        self._records, self._by_hash, self._stamp = records, by_hash, stamp

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = self._path.stat()
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    def _read(self) -> dict[str, ApiKey]:
        try:
            document = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ServiceUnavailableError("The API key file cannot be read.") from exc
        records = (ApiKey.from_json(item) for item in document.get("keys", []))
        return {r.id: r for r in records}


def _open_client(settings: RedisSettings, read_timeout: float | None) -> Redis:
    """A standalone or Sentinel-managed client (pub/sub needs one node) with AUTH and TLS."""
    if settings.mode == "cluster":
        raise ConfigError("redis.mode", ["the API key store needs standalone or sentinel Redis"])
    client = open_redis(settings, socket_timeout=read_timeout, decode_responses=True)
    assert isinstance(client, Redis)  # noqa: S101 - cluster was refused above
    return client


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """Translates Redis failures into a 503: without the key store nobody is let in."""
    try:
        yield
    except (RedisError, OSError) as exc:
        log.warning("key_store_unavailable", error=type(exc).__name__)
        raise ServiceUnavailableError(
            "The API key store is unavailable; try again shortly."
        ) from exc


class RedisKeyStore(_Store):
    """Keys in Redis, shared by every replica, with a brief in-process lookup cache that a
    message on `CHANNEL` clears on every replica."""

    def __init__(
        self, settings: RedisSettings, hash_key: bytes, cache_seconds: float, clock: Clock
    ) -> None:
        super().__init__(hash_key, clock)
        self._redis = _open_client(settings, settings.timeout)
        # Subscriptions block on reads, so they get their own client without a read timeout.
        self._listener = _open_client(settings, None)
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._generation = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()
        await self._listener.aclose()

    async def ready(self) -> str | None:
        try:
            await self._redis.ping()
        except (RedisError, OSError):
            return "API key store (redis) unavailable"
        return None

    async def list_keys(self) -> list[ApiKey]:
        with _redis_errors():
            ids = sorted(str(i) for i in await self._redis.smembers(_NS + "ids"))
            raw = await self._redis.mget([_NS + "record:" + i for i in ids]) if ids else []
        records = [ApiKey.from_json(json.loads(r)) for r in raw if r]
        return sorted(records, key=lambda r: r.created_at)

    async def _find(self, digest: str) -> ApiKey | None:
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        generation = self._generation
        with _redis_errors():
            key_id = await self._redis.get(_NS + "hash:" + digest)
            raw = await self._redis.get(_NS + "record:" + str(key_id)) if key_id else None
        record = ApiKey.from_json(json.loads(raw)) if raw else None
        if generation == self._generation:  # no invalidation arrived while we were reading
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[digest] = (time.monotonic() + self._cache_seconds, record)
        return record

    async def _insert(self, record: ApiKey) -> None:
        with _redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(_NS + "record:" + record.id, json.dumps(record.to_json()))
                pipe.set(_NS + "hash:" + record.hash, record.id)
                pipe.sadd(_NS + "ids", record.id)
                pipe.publish(CHANNEL, record.id)
                await pipe.execute()

    async def _update(self, key_id: str, change: Callable[[ApiKey], ApiKey]) -> ApiKey:
        name = _NS + "record:" + key_id
        with _redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        return await self._update_watched(pipe, name, change)
                    except WatchError:
                        continue

    async def _update_watched(
        self, pipe: Any, name: str, change: Callable[[ApiKey], ApiKey]
    ) -> ApiKey:
        await pipe.watch(name)
        raw = await pipe.get(name)
        if not raw:
            await pipe.reset()
            raise not_found(name.removeprefix(_NS + "record:"))
        before = ApiKey.from_json(json.loads(raw))
        after = change(before)
        pipe.multi()
        pipe.set(name, json.dumps(after.to_json()))
        if after.hash != before.hash:
            pipe.set(_NS + "hash:" + after.hash, after.id)
        if before.previous_hash and before.previous_hash != after.previous_hash:
            pipe.delete(_NS + "hash:" + before.previous_hash)
        pipe.publish(CHANNEL, after.id)
        await pipe.execute()
        self._invalidate()
        return after

    def _invalidate(self) -> None:
        self._generation += 1
        self._cache.clear()

    async def _listen(self) -> None:
        """Clears the cache on every change message; reconnects with backoff if Redis drops."""
        backoff = 0.1
        while True:
            try:
                async with self._listener.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self._invalidate()  # changes may have been missed while disconnected
                    backoff = 0.1
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._invalidate()
            except (RedisError, OSError) as exc:
                log.warning("key_invalidation_disconnected", error=type(exc).__name__)
            self._invalidate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
