"""The Authenticate stage: credential headers, key vs token by form, defaults, lockout, 403s."""

from __future__ import annotations

import random
import time

import jwt
import pytest

from gateway.api_keys import ApiKey
from gateway.config_auth import AuthSettings
from gateway.credentials import TokenVerifier
from gateway.errors import AuthLockoutError, CredentialError, PermissionDeniedError
from gateway.exchange import Exchange
from gateway.stages.authenticate import Authenticate, credential_from, truncated_address

RNG = random.Random(7)
SECRET = "".join(RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(40))
GOOD_KEY = "gwk_" + "".join(RNG.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(43))


class FakeKeys:
    """An in-memory key store holding one key."""

    def __init__(self, record: ApiKey) -> None:
        self.record = record
        self.asked = 0

    async def verify(self, secret: str) -> ApiKey:
        self.asked += 1
        if secret != GOOD_KEY:
            raise CredentialError("The API key is not recognised.", reason="unknown_key")
        return self.record


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def auth_settings(**extra) -> AuthSettings:
    issuer = {"issuer": "https://idp.test", "audience": ["gw"], "algorithms": ["HS256"],
              "secret": SECRET}  # fmt: skip
    return AuthSettings.model_validate({"issuers": [issuer], **extra})


def stage(record: ApiKey | None = None, clock=None, **extra) -> Authenticate:
    settings = auth_settings(**extra)
    record = record or ApiKey(id="key_1", name="ci", created_at=0, hash="h")
    return Authenticate(settings, tokens=TokenVerifier(settings), keys=FakeKeys(record),
                        clock=clock or time.monotonic)  # fmt: skip


def exchange(headers: dict[str, str], model: str | None = "gpt-4o", endpoint="chat.completions"):
    return Exchange(request_id="r", endpoint=endpoint, method="POST", path="/v1/x",
                    headers=headers, client_address="203.0.113.9", model=model)  # fmt: skip


def token(**claims) -> str:
    base = {"iss": "https://idp.test", "aud": "gw", "sub": "bob", "exp": int(time.time()) + 60}
    return jwt.encode({**base, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("header", ["Authorization", "api-key", "x-api-key"])
async def test_key_is_read_from_each_header(header):
    value = f"Bearer {GOOD_KEY}" if header == "Authorization" else GOOD_KEY
    ex = exchange({header: value})
    await stage().on_request(ex)
    assert ex.principal is not None and ex.principal.key_id == "key_1"
    assert ex.principal.method == "api_key"


async def test_jwt_is_verified_and_mapped():
    ex = exchange({"Authorization": f"Bearer {token(tid='acme', roles=['dev'])}"})
    await stage().on_request(ex)
    assert ex.principal.subject == "bob"
    assert (ex.principal.tenant, ex.principal.roles, ex.principal.method) == (
        "acme",
        ("dev",),
        "jwt",
    )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed_header"),
        ({"Authorization": "Bearer "}, "malformed_header"),
        ({"Authorization": f"Bearer {GOOD_KEY}", "x-api-key": GOOD_KEY[:-1] + "q"}, "conflicting"),
    ],
)
def test_bad_credential_headers(headers, reason):
    with pytest.raises(CredentialError) as caught:
        credential_from(headers)
    assert caught.value.reason == reason


async def test_neither_key_nor_jwt_is_malformed():
    with pytest.raises(CredentialError) as caught:
        await stage().on_request(exchange({"Authorization": "Bearer sk-something-else"}))
    assert caught.value.reason == "malformed"


async def test_key_and_token_are_told_apart_by_form_not_by_trial():
    keys_stage = stage()
    with pytest.raises(CredentialError):
        await keys_stage.on_request(exchange({"Authorization": f"Bearer {token(exp=1)}"}))
    assert keys_stage._keys.asked == 0  # a JWT never reaches the key store


async def test_model_outside_the_allowed_globs_is_403():
    record = ApiKey(id="key_1", name="ci", created_at=0, hash="h", models=("gpt-4o*",))
    ex = exchange({"api-key": GOOD_KEY}, model="fast")
    with pytest.raises(PermissionDeniedError) as caught:
        await stage(record).on_request(ex)
    assert caught.value.error_code == "model_not_allowed"
    ok = exchange({"api-key": GOOD_KEY}, model="gpt-4o-mini")
    await stage(record).on_request(ok)


async def test_endpoint_outside_the_allowed_list_is_403():
    record = ApiKey(id="key_1", name="ci", created_at=0, hash="h", endpoints=("embeddings",))
    with pytest.raises(PermissionDeniedError) as caught:
        await stage(record).on_request(exchange({"api-key": GOOD_KEY}))
    assert caught.value.error_code == "endpoint_not_allowed"


async def test_defaults_come_from_tenant_then_roles_then_global():
    extra = {"default_models": ["cheap"], "tenants": {"acme": {"models": ["gpt-4o*"]}},
             "roles": {"dev": {"models": ["fast"]}, "ops": {"models": ["big"]}}}  # fmt: skip
    s = stage(**extra)
    assert s._access("models", ("x",), "acme", ("dev",)) == ("x",)
    assert s._access("models", None, "acme", ("dev",)) == ("gpt-4o*",)
    assert s._access("models", None, "other", ("dev", "ops")) == ("fast", "big")
    assert s._access("models", None, None, ()) == ("cheap",)


async def test_repeated_failures_lock_the_address_out_then_cool_down():
    clock = FakeClock()
    s = stage(clock=clock, lockout={"threshold": 3, "window_seconds": 60, "cooldown_seconds": 30})
    bad = {"api-key": "gwk_" + "Z" * 43}
    for _ in range(3):
        with pytest.raises(CredentialError):
            await s.on_request(exchange(bad))
    with pytest.raises(AuthLockoutError) as caught:
        await s.on_request(exchange({"api-key": GOOD_KEY}))  # even a good key waits
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "30"
    clock.now += 31
    await s.on_request(exchange({"api-key": GOOD_KEY}))


async def test_failures_outside_the_window_do_not_add_up():
    clock = FakeClock()
    s = stage(clock=clock, lockout={"threshold": 2, "window_seconds": 10, "cooldown_seconds": 30})
    for _ in range(3):
        with pytest.raises(CredentialError):
            await s.on_request(exchange({"api-key": "gwk_" + "Z" * 43}))
        clock.now += 11
    await s.on_request(exchange({"api-key": GOOD_KEY}))


@pytest.mark.parametrize(("address", "shown"), [("203.0.113.9", "203.0.113.0/24"),
                         ("2001:db8:1:2::5", "2001:db8:1::/48"), ("", "unknown")])  # fmt: skip
def test_source_addresses_are_truncated(address, shown):
    assert truncated_address(address) == shown


async def test_one_identity_gets_one_principal_and_another_its_own():
    s = stage(tenants={"acme": {"models": ["gpt-4o*"]}})
    soon = int(time.time()) + 60
    first, again = (exchange({"Authorization": f"Bearer {token(tid='acme', exp=soon + n)}"})
                    for n in (0, 1))  # fmt: skip
    other = exchange({"Authorization": f"Bearer {token(sub='eve')}"})
    for ex in (first, again, other):
        await s.on_request(ex)
    assert first.principal is again.principal  # built once, from the cached identity
    assert first.principal.models == ("gpt-4o*",) and first.principal.subject == "bob"
    assert other.principal.subject == "eve" and other.principal.models == ("*",)


def test_the_same_credential_in_two_headers_is_one_credential():
    assert credential_from({"Authorization": f"Bearer {GOOD_KEY}", "api-key": GOOD_KEY}) == GOOD_KEY
    assert credential_from({"Authorization": f"  Bearer   {GOOD_KEY} "}) == GOOD_KEY


@pytest.mark.parametrize(("endpoints", "allowed"), [
    (("*",), True), (("chat.*",), True), (("chat.completions",), True),
    (("embeddings", "chat*"), True), (("embeddings",), False), ((), False),
])  # fmt: skip
async def test_endpoint_globs(endpoints, allowed):
    record = ApiKey(id="key_1", name="ci", created_at=0, hash="h", endpoints=endpoints)
    ex = exchange({"api-key": GOOD_KEY})
    if allowed:
        await stage(record).on_request(ex)
    else:
        with pytest.raises(PermissionDeniedError):
            await stage(record).on_request(ex)
