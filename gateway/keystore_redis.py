"""API keys in Redis, shared by every replica.

Owns the key store's Redis clients (standalone or Sentinel: pub/sub needs one node), the
records, hashes and ids under `gateway:keys:`, updates under WATCH, the brief in-process lookup
cache and the change channel that clears every replica's cache at once (if that channel is
down a cached lookup is still trusted for at most `auth.keys.cache_seconds`), and the
translation of Redis errors into a 503. Must never log, return or store a key in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from gateway.api_keys import ApiKey, Clock, StoreBase, not_found
from gateway.config import RedisSettings
from gateway.config_load import ConfigError
from gateway.errors import ServiceUnavailableError
from gateway.log import get_logger
from gateway.redis_client import open_redis

_NS = "gateway:keys:"
CHANNEL = _NS + "changed"
_CACHE_LIMIT = 10_000
log = get_logger("gateway.keystore")


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


class RedisKeyStore(StoreBase):
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
