"""JWT verification: allow-lists, key sources, JWKS refresh, hostile tokens, claim mapping."""

from __future__ import annotations

import base64
import json
import random
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from gateway import credentials
from gateway.claims import claimed_from
from gateway.config_auth import AuthSettings, ClaimPaths, IssuerSettings
from gateway.credentials import (
    JwksUnavailableError,
    RemoteJwks,
    TokenVerifier,
    looks_like_jwt,
    parse_jwks,
)
from gateway.errors import CredentialError, ServiceUnavailableError

ISSUER = "https://idp.test"
AUDIENCE = "llm-gateway"
RNG = random.Random(3)


def _secret() -> str:
    return "".join(RNG.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(40))


HMAC_SECRET = _secret()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk_of(key: Any, kid: str, alg: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, alg: str, kid: str | None = "k1", **overrides: Any) -> str:
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_issuer(tmp_path, rsa_key, **extra: Any) -> IssuerSettings:
    path = tmp_path / "k1.pem"
    path.write_bytes(public_pem(rsa_key))
    return IssuerSettings(issuer=ISSUER, audience=(AUDIENCE,), algorithms=("RS256",),
                          public_keys={"k1": path}, **extra)  # fmt: skip


async def test_valid_rs256_token_from_pem_key(tmp_path, rsa_key):
    verifier = TokenVerifier(AuthSettings(issuers=(rsa_issuer(tmp_path, rsa_key),)))
    claimed = await verifier.verify(sign(rsa_key, "RS256", tid="acme", roles=["dev"]))
    assert (claimed.subject, claimed.tenant, claimed.roles) == ("alice", "acme", ("dev",))
    assert claimed.models is None


async def test_valid_es256_token_from_jwks_file(tmp_path, ec_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(ec_key, "e1", "ES256")]}))
    issuer = IssuerSettings(issuer=ISSUER, audience=(AUDIENCE,), algorithms=("ES256",),
                            jwks_file=path)  # fmt: skip
    verifier = TokenVerifier(AuthSettings(issuers=(issuer,)))
    assert (await verifier.verify(sign(ec_key, "ES256", kid="e1"))).subject == "alice"


async def test_valid_hs256_token_from_shared_secret():
    issuer = IssuerSettings(issuer=ISSUER, audience=(AUDIENCE,), algorithms=("HS256",),
                            secret=HMAC_SECRET)  # fmt: skip
    verifier = TokenVerifier(AuthSettings(issuers=(issuer,)))
    assert (await verifier.verify(sign(HMAC_SECRET.encode(), "HS256"))).subject == "alice"


def _unsigned(**overrides: Any) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "k1"}).encode())
    return f"{header}.{b64(json.dumps(claims(**overrides)).encode())}."


def _hs256_with_public_key(rsa_key: Any) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64(json.dumps(claims()).encode())
    import hashlib
    import hmac

    mac = hmac.new(public_pem(rsa_key), f"{header}.{payload}".encode(), hashlib.sha256)
    return f"{header}.{payload}.{b64(mac.digest())}"


def _tampered(rsa_key: Any) -> str:
    header, _, signature = sign(rsa_key, "RS256").split(".")
    return f"{header}.{b64(json.dumps(claims(sub='mallory')).encode())}.{signature}"


HOSTILE = [
    ("alg_none", lambda k: _unsigned(), "alg_none"),
    ("hs256_public_key", _hs256_with_public_key, "algorithm_not_allowed"),
    ("expired", lambda k: sign(k, "RS256", exp=int(time.time()) - 600), "expired"),
    ("not_yet_valid", lambda k: sign(k, "RS256", nbf=int(time.time()) + 600), "not_yet_valid"),
    ("wrong_iss", lambda k: sign(k, "RS256", iss="https://evil.test"), "wrong_issuer"),
    ("wrong_aud", lambda k: sign(k, "RS256", aud="someone-else"), "wrong_audience"),
    ("missing_exp", lambda k: sign(k, "RS256", exp=None), "missing_claim"),
    ("tampered", _tampered, "bad_signature"),
    ("unknown_kid", lambda k: sign(k, "RS256", kid="k9"), "unknown_kid"),
    ("path_kid", lambda k: sign(k, "RS256", kid="../../etc/passwd"), "malformed_kid"),
    ("sql_kid", lambda k: sign(k, "RS256", kid="k1' OR '1'='1"), "malformed_kid"),
    ("oversized", lambda k: sign(k, "RS256", pad="x" * 9000), "oversized"),
    ("garbage", lambda k: "not.a-jwt!.at all", "malformed"),
    ("bad_json", lambda k: f"{b64(b'{')}.{b64(b'{}')}.{b64(b'x')}", "malformed"),
]


@pytest.mark.parametrize(("case", "make", "reason"), HOSTILE, ids=[c[0] for c in HOSTILE])
async def test_hostile_token_is_rejected(tmp_path, rsa_key, case, make, reason):
    verifier = TokenVerifier(AuthSettings(issuers=(rsa_issuer(tmp_path, rsa_key),)))
    token = make(rsa_key)
    with pytest.raises(CredentialError) as caught:
        await verifier.verify(token)
    assert caught.value.reason == reason
    assert caught.value.status == 401
    assert token not in caught.value.message


@pytest.mark.parametrize(
    "bad",
    [
        {"algorithms": ("none",), "public_keys": {"k": "k.pem"}},
        {"algorithms": ("HS256", "RS256"), "public_keys": {"k": "k.pem"}},
        {"algorithms": ("HS256",), "jwks_url": "https://idp.test/jwks"},
        {"algorithms": ("RS256",), "secret": "s" * 40},
        {"algorithms": ("HS256",), "secret": "too-short"},
        {"algorithms": ("RS256",)},
        {"algorithms": ("RS256",), "jwks_url": "http://idp.example/jwks"},
    ],
)
def test_unsafe_issuer_config_is_refused(bad):
    with pytest.raises(ValidationError):
        IssuerSettings(issuer=ISSUER, audience=(AUDIENCE,), **bad)


def test_jwks_parse_skips_symmetric_and_encryption_keys(rsa_key):
    document = {"keys": [
        {"kty": "oct", "kid": "h", "k": b64(b"secret")},
        {**jwk_of(rsa_key, "enc", "RS256"), "use": "enc"},
        {**jwk_of(rsa_key, "../x", "RS256")},
        jwk_of(rsa_key, "good", "RS256"),
        {"kty": "RSA", "kid": "broken"},
    ]}  # fmt: skip
    assert list(parse_jwks(document)) == ["good"]


class FakeIdp:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches = 0
        self.down = False

    async def fetch(self, url: str, seconds: float) -> dict[str, Any]:
        self.fetches += 1
        if self.down:
            raise JwksUnavailableError("connection refused")
        return self.document


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def remote(idp: FakeIdp, clock: FakeClock) -> RemoteJwks:
    issuer = IssuerSettings(issuer=ISSUER, audience=(AUDIENCE,), jwks_url="https://idp.test/j",
                            jwks_refresh_seconds=30, jwks_cache_seconds=300)  # fmt: skip
    return RemoteJwks(issuer, idp.fetch, clock)


async def test_unknown_kid_refreshes_once_then_is_rate_limited(rsa_key):
    idp, clock = FakeIdp({"keys": [jwk_of(rsa_key, "k1", "RS256")]}), FakeClock()
    source = remote(idp, clock)
    await source.refresh()
    idp.document = {"keys": [jwk_of(rsa_key, "k1", "RS256"), jwk_of(rsa_key, "k2", "RS256")]}
    clock.now += 31
    assert await source.find("k2") is not None
    assert idp.fetches == 2
    assert await source.find("k3") is None
    assert idp.fetches == 2  # within the refresh interval: no new fetch
    clock.now += 31
    assert await source.find("k3") is None
    assert idp.fetches == 3


async def test_idp_down_keeps_last_good_keys(rsa_key):
    idp, clock = FakeIdp({"keys": [jwk_of(rsa_key, "k1", "RS256")]}), FakeClock()
    source = remote(idp, clock)
    await source.refresh()
    idp.down = True
    clock.now += 10_000  # long past the cache lifetime
    await source.refresh()
    assert await source.find("k1") is not None
    await source.close()


async def test_no_keys_ever_fetched_fails_closed():
    idp, clock = FakeIdp({}), FakeClock()
    idp.down = True
    with pytest.raises(ServiceUnavailableError):
        await remote(idp, clock).find("k1")


def test_claims_map_through_configured_paths():
    paths = ClaimPaths(
        subject=("email", "sub"),
        tenant=("org_id",),
        roles=("realm_access.roles", "scope"),
        models=("https://gw/models",),
    )
    token_claims = {"sub": "u1", "org_id": "acme", "realm_access": {"roles": ["a", "b"]},
                    "https://gw/models": "gpt-4o*, fast", "tier": 3}  # fmt: skip
    claimed = claimed_from(token_claims, paths, ISSUER)
    assert claimed.subject == "u1"
    assert claimed.tenant == "acme"
    assert claimed.roles == ("a", "b")
    assert claimed.models == ("gpt-4o*", "fast")
    assert claimed.tier == "3"


def test_scope_string_becomes_roles_by_default():
    claimed = claimed_from({"sub": "svc", "scope": "read write"}, ClaimPaths(), ISSUER)
    assert claimed.roles == ("read", "write")


def test_token_without_subject_is_rejected():
    with pytest.raises(CredentialError) as caught:
        claimed_from({"iss": ISSUER}, ClaimPaths(), ISSUER)
    assert caught.value.reason == "no_subject"


def test_jwt_is_told_by_form():
    assert looks_like_jwt("aGVhZA.cGF5bG9hZA.c2ln")
    assert not looks_like_jwt("gwk_" + "a" * 43)
    assert not looks_like_jwt("a.b")


async def test_a_verified_token_is_remembered_until_its_expiry_at_the_latest(monkeypatch):
    issuer = IssuerSettings(issuer=ISSUER, audience=(AUDIENCE,), algorithms=("HS256",),
                            secret=HMAC_SECRET)  # fmt: skip
    verifier = TokenVerifier(AuthSettings(issuers=(issuer,)))
    decoded: list[str] = []
    real_decode = credentials._decode

    def counting_decode(token: str, *args: Any) -> dict[str, Any]:
        decoded.append(token)
        return real_decode(token, *args)

    monkeypatch.setattr(credentials, "_decode", counting_decode)
    soon = int(time.time()) + 2
    token = sign(HMAC_SECRET.encode(), "HS256", exp=soon)
    other = sign(HMAC_SECRET.encode(), "HS256", sub="bob")
    assert (await verifier.verify(token)).subject == "alice"
    assert (await verifier.verify(token)).subject == "alice"
    assert (await verifier.verify(other)).subject == "bob"
    assert decoded == [token, other]  # the second use of `token` was not verified again

    later = soon + 1.0  # past its exp, the token is verified again (pyjwt has its own clock)
    monkeypatch.setattr(credentials.time, "time", lambda: later)
    await verifier.verify(token)
    assert decoded == [token, other, token]


async def test_only_a_verified_unexpired_token_is_recalled(monkeypatch):
    issuer = IssuerSettings(issuer=ISSUER, audience=(AUDIENCE,), algorithms=("HS256",),
                            secret=HMAC_SECRET)  # fmt: skip
    verifier = TokenVerifier(AuthSettings(issuers=(issuer,)))
    soon = int(time.time()) + 2
    token = sign(HMAC_SECRET.encode(), "HS256", exp=soon)
    assert verifier.recalled(token) is None  # never verified: `verify` must check it
    claimed = await verifier.verify(token)
    assert verifier.recalled(token) is claimed
    assert verifier.recalled(token + "x") is None

    later = soon + 1.0
    monkeypatch.setattr(credentials.time, "time", lambda: later)
    assert verifier.recalled(token) is None  # past its exp: verified again, and refused
