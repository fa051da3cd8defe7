"""API keys: format, keyed hashes only, revoke / expire / rotate, file and real-Redis stores."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.api_keys import KEY_SHAPE, KeySpec, looks_like_key, parse_duration, parse_names
from gateway.config import Settings
from gateway.errors import CredentialError, NotFoundError, ServiceUnavailableError
from gateway.keystore import FileKeyStore, open_key_store

HASH_KEY = b"unit-test-hash-key"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def settings_for(tmp_path, redis_url: str | None = None, cache_seconds: float = 2.0) -> Settings:
    return Settings.model_validate({
        "providers": {"p": {"kind": "demo"}},
        "models": [{"name": "m", "provider": "p"}],
        "redis": {"url": redis_url} if redis_url else {},
        "auth": {"keys": {"path": str(tmp_path / "keys.json"), "hash_key": "t" * 32,
                          "cache_seconds": cache_seconds}},
    })  # fmt: skip


@pytest.fixture
async def file_store(tmp_path):
    clock = FakeClock()
    store = FileKeyStore(tmp_path / "keys.json", HASH_KEY, 2.0, clock)
    await store.start()
    store.clock = clock  # type: ignore[attr-defined]
    yield store
    await store.close()


async def _reason(store, secret: str) -> str:
    with pytest.raises(CredentialError) as caught:
        await store.verify(secret)
    return caught.value.reason


async def test_key_has_prefix_and_256_bits_and_only_its_hash_is_stored(file_store, tmp_path):
    record, secret = await file_store.create(KeySpec(name="ci", models=("gpt-4o*",)))
    assert KEY_SHAPE.match(secret) and looks_like_key(secret)
    assert len(secret) - len("gwk_") >= 43  # 32 random bytes, base64url
    stored = (tmp_path / "keys.json").read_text()
    assert secret not in stored and secret[4:] not in stored
    assert record.hash in stored and record.hash != secret
    assert (tmp_path / "keys.json").stat().st_mode & 0o077 == 0
    assert (await file_store.verify(secret)).models == ("gpt-4o*",)


async def test_two_keys_never_collide(file_store):
    secrets = {(await file_store.create(KeySpec(name=f"k{i}")))[1] for i in range(20)}
    assert len(secrets) == 20


async def test_unknown_key_is_rejected(file_store):
    await file_store.create(KeySpec(name="a"))
    assert await _reason(file_store, "gwk_" + "A" * 43) == "unknown_key"


async def test_revoked_key_is_rejected(file_store):
    record, secret = await file_store.create(KeySpec(name="a"))
    await file_store.revoke(record.id)
    assert await _reason(file_store, secret) == "revoked"
    assert (await file_store.get(record.id)).public(0)["status"] == "revoked"


async def test_key_expires(file_store):
    _, secret = await file_store.create(KeySpec(name="a", expires_in=60))
    await file_store.verify(secret)
    file_store.clock.now += 61
    assert await _reason(file_store, secret) == "expired"


async def test_rotation_keeps_old_secret_for_the_grace_period(file_store):
    record, old = await file_store.create(KeySpec(name="a"))
    rotated, new = await file_store.rotate(record.id, grace=3600)
    assert rotated.id == record.id and new != old
    await file_store.verify(old)
    await file_store.verify(new)
    file_store.clock.now += 3601
    assert await _reason(file_store, old) == "rotated"
    await file_store.verify(new)


async def test_unknown_id_is_not_found(file_store):
    with pytest.raises(NotFoundError):
        await file_store.revoke("key_missing")


async def test_listing_never_shows_hashes(file_store):
    await file_store.create(KeySpec(name="a"))
    shown = [r.public(0) for r in await file_store.list_keys()]
    assert "hash" not in shown[0] and "previous_hash" not in shown[0]


async def test_running_store_sees_keys_another_process_wrote(tmp_path, file_store):
    other = FileKeyStore(tmp_path / "keys.json", HASH_KEY, 2.0, time.time)
    await other.start()
    record, secret = await other.create(KeySpec(name="from-cli"))
    file_store._checked_at -= 0.5  # past the unknown-key recheck, well within cache_seconds
    assert (await file_store.verify(secret)).id == record.id  # a new key is looked up at once
    await other.revoke(record.id)
    assert (await file_store.verify(secret)).id == record.id  # known keys: cached, as documented
    file_store._checked_at = 0.0  # cache_seconds have passed
    assert await _reason(file_store, secret) == "revoked"


async def test_a_flood_of_unknown_keys_does_not_reread_the_file(tmp_path, file_store, monkeypatch):
    stats = []
    real_stat = file_store._stat
    monkeypatch.setattr(file_store, "_stat", lambda: stats.append(1) or real_stat())
    for _ in range(20):
        assert await _reason(file_store, "gwk_" + "x" * 43) == "unknown_key"
    assert len(stats) <= 1  # at most one look at the file per recheck interval


DURATIONS = [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("30d", 2592000), ("2w", 1209600)]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1h", "1y", "h", "1 h 2"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_names_parse():
    assert parse_names(" gpt-4o*, fast ,") == ("gpt-4o*", "fast")


async def test_redis_stores_share_keys_and_revocation_reaches_the_other(tmp_path, redis_server):
    # A long cache proves the other replica hears the revocation by pub/sub, not by TTL.
    settings = settings_for(tmp_path, redis_server.url, cache_seconds=60)
    first, second = await open_key_store(settings), await open_key_store(settings)
    try:
        await asyncio.sleep(0.2)  # both subscribed
        record, secret = await first.create(KeySpec(name="shared", tenant="acme"))
        assert (await second.verify(secret)).tenant == "acme"
        await first.revoke(record.id)
        deadline = time.monotonic() + 2.0
        while True:
            try:
                await second.verify(secret)
            except CredentialError as error:
                assert error.reason == "revoked"
                break
            assert time.monotonic() < deadline, "revocation did not reach the other store"
            await asyncio.sleep(0.02)
        listed = await second.list_keys()
        assert [r.id for r in listed] == [record.id]
    finally:
        await first.close()
        await second.close()


async def test_redis_rotation_and_grace(tmp_path, redis_server):
    store = await open_key_store(settings_for(tmp_path, redis_server.url))
    try:
        record, old = await store.create(KeySpec(name="r"))
        _, new = await store.rotate(record.id, grace=3600)
        await store.verify(old)
        await store.verify(new)
        with pytest.raises(NotFoundError):
            await store.rotate("key_missing", grace=1)
    finally:
        await store.close()


async def test_redis_down_fails_closed(tmp_path, redis_server):
    store = await open_key_store(settings_for(tmp_path, redis_server.url))
    try:
        redis_server.stop()
        with pytest.raises(ServiceUnavailableError):
            await store.verify("gwk_" + "B" * 43)
        assert await store.ready() is not None
    finally:
        await store.close()
