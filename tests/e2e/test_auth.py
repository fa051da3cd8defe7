"""Authentication and authorization through the openai SDK: hostile tokens, valid JWTs and keys,
JWKS rotation against a local IdP, lockout, the admin API, and no credential in logs or upstream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import openai
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.api_keys import KeySpec
from gateway.config_load import DEFAULTS_DIR
from gateway.keystore import FileKeyStore
from tests.conftest import PROVIDER_KEY, base_config

AUDIENCE = "llm-gateway"
RSA_ISSUER = "https://idp.rsa.test"
EC_ISSUER = "https://idp.ec.test"
HS_ISSUER = "https://idp.hs.test"
RNG = random.Random(11)
HS_SECRET = "".join(RNG.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(48))
HASH_KEY = "".join(RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(32))
MESSAGES = [{"role": "user", "content": "hello there"}]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid, "alg": "RS256", "use": "sig"}


@dataclass
class Idp:
    """A local identity provider serving its JWKS on loopback."""

    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    fetches: int = 0
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> Idp:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": [rsa_jwk(k, kid) for kid, k in self.keys.items()]})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Authority:
    idp: Idp
    ec_key: ec.EllipticCurvePrivateKey
    tmp_path: Any
    store: FileKeyStore

    def config(self, provider, **auth: Any) -> dict[str, Any]:
        pem = self.tmp_path / "ec.pem"
        pem.write_bytes(
            self.ec_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        issuers = [
            {
                "issuer": RSA_ISSUER,
                "audience": [AUDIENCE],
                "algorithms": ["RS256"],
                "jwks_url": self.idp.url,
                "jwks_refresh_seconds": 0,
            },
            {
                "issuer": EC_ISSUER,
                "audience": [AUDIENCE],
                "algorithms": ["ES256"],
                "public_keys": {"e1": str(pem)},
            },
            {
                "issuer": HS_ISSUER,
                "audience": [AUDIENCE],
                "algorithms": ["HS256"],
                "secret": HS_SECRET,
            },
        ]
        section = {
            "mode": "required",
            "issuers": issuers,
            "lockout": {"threshold": 1000},
            "max_token_bytes": 4096,
            "keys": {"path": str(self.tmp_path / "keys.json"), "hash_key": HASH_KEY},
        }
        section.update(auth)
        return base_config(provider, auth=section)

    def rs256(self, kid: str = "k1", **claims: Any) -> str:
        return jwt.encode(
            _claims(RSA_ISSUER, **claims),
            self.idp.keys[kid],
            algorithm="RS256",
            headers={"kid": kid},
        )

    def es256(self, **claims: Any) -> str:
        return jwt.encode(
            _claims(EC_ISSUER, **claims), self.ec_key, algorithm="ES256", headers={"kid": "e1"}
        )

    def hs256(self, **claims: Any) -> str:
        return jwt.encode(_claims(HS_ISSUER, **claims), HS_SECRET, algorithm="HS256")

    async def key(self, **spec: Any) -> str:
        return (await self.store.create(KeySpec(name=spec.pop("name", "test"), **spec)))[1]


def _claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": issuer, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
async def authority(tmp_path):
    idp = Idp()
    idp.add_key("k1")
    await idp.start()
    store = FileKeyStore(tmp_path / "keys.json", HASH_KEY.encode(), 2.0, time.time)
    await store.start()
    yield Authority(idp, ec.generate_private_key(ec.SECP256R1()), tmp_path, store)
    await idp.stop()


def _hs256_signed_with_public_key(a: Authority) -> str:
    pem = (
        a.idp.keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64(json.dumps(_claims(RSA_ISSUER)).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def _alg_none(a: Authority) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(_claims(RSA_ISSUER)).encode())}."


def _tampered(a: Authority) -> str:
    header, _, signature = a.rs256().split(".")
    return f"{header}.{b64(json.dumps(_claims(RSA_ISSUER, sub='root')).encode())}.{signature}"


async def _revoked_key(a: Authority) -> str:
    record, secret = await a.store.create(KeySpec(name="gone"))
    await a.store.revoke(record.id)
    return secret


async def _expired_key(a: Authority) -> str:
    return (await a.store.create(KeySpec(name="old", expires_in=0.001)))[1]


HOSTILE = [
    ("alg_none", _alg_none, "unsigned (alg 'none')"),
    ("hs256_with_rsa_public_key", _hs256_signed_with_public_key, "algorithm is not accepted"),
    ("expired", lambda a: a.rs256(exp=int(time.time()) - 600), "has expired"),
    ("not_yet_valid", lambda a: a.rs256(nbf=int(time.time()) + 600), "not yet valid"),
    (
        "wrong_iss",
        lambda a: jwt.encode(
            _claims("https://evil.test"), a.idp.keys["k1"], "RS256", headers={"kid": "k1"}
        ),
        "issuer is not trusted",
    ),
    ("wrong_aud", lambda a: a.rs256(aud="another-service"), "audience (aud) does not match"),
    ("missing_exp", lambda a: a.rs256(exp=None), "lacks the required claim 'exp'"),
    ("tampered_payload", _tampered, "signature is invalid"),
    (
        "unknown_kid",
        lambda a: jwt.encode(
            _claims(RSA_ISSUER), a.idp.keys["k1"], "RS256", headers={"kid": "k404"}
        ),
        "not one of its issuer's keys",
    ),
    (
        "kid_path",
        lambda a: jwt.encode(
            _claims(RSA_ISSUER), a.idp.keys["k1"], "RS256", headers={"kid": "../../../etc/passwd"}
        ),
        "kid) is malformed",
    ),
    (
        "kid_sql",
        lambda a: jwt.encode(
            _claims(RSA_ISSUER),
            a.idp.keys["k1"],
            "RS256",
            headers={"kid": "k1'; DROP TABLE keys;--"},
        ),
        "kid) is malformed",
    ),
    ("oversized", lambda a: a.rs256(padding="p" * 4500), "larger than this gateway accepts"),
    ("garbage", lambda a: "this is not a credential at all", "neither a gateway API key"),
    ("revoked_key", _revoked_key, "has been revoked"),
    ("expired_key", _expired_key, "has expired"),
]


@pytest.mark.parametrize(("case", "make", "message"), HOSTILE, ids=[c[0] for c in HOSTILE])
async def test_hostile_credential_is_rejected_with_401(
    authority, provider, start_gateway, log_buffer, case, make, message
):
    made = make(authority)
    credential = await made if asyncio.iscoroutine(made) else made
    gateway = await start_gateway(authority.config(provider))
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.client(credential).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    assert caught.value.status_code == 401
    assert message in caught.value.message
    assert credential not in json.dumps(caught.value.body)
    assert provider.control.received == []
    logs = log_buffer.getvalue()
    assert '"auth_failed"' in logs and '"source":"127.0.0.0/24"' in logs
    assert credential not in logs


@pytest.mark.parametrize("kind", ["rs256", "es256", "hs256", "api_key"])
async def test_valid_credential_reaches_the_model(
    authority, provider, start_gateway, log_buffer, kind
):
    credential = await authority.key() if kind == "api_key" else getattr(authority, kind)()
    gateway = await start_gateway(authority.config(provider))
    client = gateway.client(credential)
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "hello there"
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    seen = json.dumps([[dict(r.headers), r.body] for r in provider.control.received])
    assert credential not in seen and credential.split(".")[-1] not in seen
    assert all(
        r.headers["Authorization"] == f"Bearer {PROVIDER_KEY}" for r in provider.control.received
    )
    assert credential not in log_buffer.getvalue()


async def test_disallowed_model_is_403_and_listing_shows_only_allowed(
    authority, provider, start_gateway
):
    key = await authority.key(models=("gpt-4o*",))
    gateway = await start_gateway(authority.config(provider))
    client = gateway.client(key)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(model="fast", messages=MESSAGES)
    assert caught.value.code == "model_not_allowed"
    assert caught.value.body["type"] == "permission_error"
    assert [m.id async for m in client.models.list()] == ["gpt-4o-mini"]
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("fast")
    assert provider.control.received == []


async def test_token_models_claim_and_role_defaults_apply(authority, provider, start_gateway):
    config = authority.config(
        provider, roles={"embedder": {"models": ["text-embedding-*"], "endpoints": ["embeddings"]}}
    )
    gateway = await start_gateway(config)
    token_client = gateway.client(authority.hs256(models="fast"))
    assert [m.id async for m in token_client.models.list()] == ["fast"]
    role_client = gateway.client(authority.es256(roles=["embedder"]))
    await role_client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await role_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.code == "endpoint_not_allowed"


async def test_repeated_failures_lock_the_address_out(authority, provider, start_gateway):
    good = await authority.key()
    config = authority.config(provider, lockout={"threshold": 3, "cooldown_seconds": 120})
    gateway = await start_gateway(config)
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            await gateway.client("gwk_" + "x" * 43).models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        await gateway.client(good).models.list()
    assert caught.value.code == "too_many_failed_authentications"
    assert int(caught.value.response.headers["Retry-After"]) > 100


async def test_missing_credential_says_how_to_send_one(authority, provider, start_gateway):
    gateway = await start_gateway(authority.config(provider))
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/v1/models") as response,
    ):
        body = await response.json()
    assert response.status == 401
    assert body["error"]["code"] == "missing_credential"
    assert "Authorization: Bearer" in body["error"]["message"]


async def test_jwks_rotation_and_idp_outage(authority, provider, start_gateway):
    gateway = await start_gateway(authority.config(provider))
    old = authority.rs256("k1")
    await gateway.client(old).models.list()
    authority.idp.add_key("k2")  # the IdP rotates: a new key appears in its JWKS
    fetches = authority.idp.fetches
    new = authority.rs256("k2")
    assert [m.id async for m in gateway.client(new).models.list()]
    assert authority.idp.fetches == fetches + 1  # exactly one refresh
    await authority.idp.stop()  # the IdP goes down: the last good keys still verify
    await gateway.client(old).models.list()
    await gateway.client(new).models.list()
    authority.idp.add_key("k3")
    with pytest.raises(openai.AuthenticationError):
        await gateway.client(authority.rs256("k3")).models.list()


async def admin(session, gateway, method: str, path: str, credential: str, body=None):
    headers = {"Authorization": f"Bearer {credential}"}
    async with session.request(method, gateway.url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_admin_api_manages_keys_for_admins_only(
    authority, provider, start_gateway, log_buffer
):
    gateway = await start_gateway(authority.config(provider))
    boss = authority.rs256(roles=["gateway-admin"])
    async with aiohttp.ClientSession() as session:
        status, created = await admin(
            session,
            gateway,
            "POST",
            "/admin/keys",
            boss,
            {"name": "svc", "models": ["gpt-4o*"], "expires_in": "1d"},
        )
        assert status == 201 and created["key"].startswith("gwk_")
        secret, key_id = created["key"], created["id"]
        await gateway.client(secret).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        status, listing = await admin(session, gateway, "GET", "/admin/keys", boss)
        assert secret not in json.dumps(listing) and "hash" not in listing["data"][0]
        status, rotated = await admin(
            session, gateway, "POST", f"/admin/keys/{key_id}/rotate", boss, {"grace": "10m"}
        )
        await gateway.client(secret).models.list()  # still inside the grace period
        await gateway.client(rotated["key"]).models.list()
        status, _ = await admin(session, gateway, "DELETE", f"/admin/keys/{key_id}", boss)
        assert status == 200
        with pytest.raises(openai.AuthenticationError) as caught:
            await gateway.client(rotated["key"]).models.list()
        assert "revoked" in caught.value.message
        status, denied = await admin(session, gateway, "GET", "/admin/keys", authority.rs256())
        assert status == 403 and denied["error"]["code"] == "admin_role_required"
        status, _ = await admin(session, gateway, "GET", "/admin/keys", "gwk_" + "y" * 43)
        assert status == 401
    logs = log_buffer.getvalue()
    for event in ("admin_key_created", "admin_key_rotated", "admin_key_revoked", "admin_denied"):
        assert f'"{event}"' in logs
    assert secret not in logs and rotated["key"] not in logs and boss not in logs


async def test_auth_disabled_warns_loudly_and_closes_the_admin_api(
    provider, start_gateway, log_buffer
):
    gateway = await start_gateway(base_config(provider))
    assert '"auth_disabled"' in log_buffer.getvalue()
    async with aiohttp.ClientSession() as session:
        status, body = await admin(session, gateway, "GET", "/admin/keys", "anything")
    assert status == 403 and body["error"]["code"] == "admin_disabled"


async def test_demo_default_needs_a_key_and_one_command_makes_it(tmp_path, start_gateway):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    made = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "keys", "create", "--name", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("gwk_") and key not in made.stderr
    config = yaml.safe_load((DEFAULTS_DIR / "demo.yaml").read_text())
    config["auth"] = {"keys": {"path": str(tmp_path / "var" / "keys.json")}}
    gateway = await start_gateway(config)
    with pytest.raises(openai.AuthenticationError):
        await gateway.client("gwk_" + "z" * 43).models.list()
    reply = await gateway.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert reply.choices[0].message.content == "hello there"
