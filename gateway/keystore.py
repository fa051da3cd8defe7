"""The API key store the config names: the key file, or Redis (`gateway.keystore_redis`).

Owns opening the store (and warning about the demo hash key) and `FileKeyStore`: keys in one
JSON file, changed under an exclusive lock and re-read when another process changed it, with a
brief lookup cache. Must never log, return or store a key in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.api_keys import ApiKey, Clock, KeyStore, StoreBase, not_found
from gateway.config import Settings
from gateway.config_auth import DEMO_HASH_KEY
from gateway.errors import ServiceUnavailableError
from gateway.keystore_redis import RedisKeyStore
from gateway.log import get_logger

log = get_logger("gateway.keystore")


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


_UNKNOWN_RECHECK = 0.2


class FileKeyStore(StoreBase):
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
