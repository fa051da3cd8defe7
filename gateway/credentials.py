"""JWT verification for the configured issuers, and the claims a valid token grants.

Owns pyjwt and the JWKS documents: per-issuer algorithm allow-lists (`none` never, HMAC only
with a shared secret), keys from a secret, PEM files, a JWKS file or a JWKS URL (cached,
refreshed at a limited rate on an unknown `kid`, last good set kept while the IdP is down), the
token size cap, and the cache of verified tokens; the claims become a `Claimed` identity in
`gateway.claims`. Must not decide what a caller may use (the `Authenticate` stage does) and
must never log or echo a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.claims import Claimed, claimed_from
from gateway.config_auth import AuthSettings, IssuerSettings
from gateway.config_load import ConfigError
from gateway.errors import CredentialError, ServiceUnavailableError
from gateway.log import get_logger

JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
# Key ids are only ever dictionary keys here, but one carrying path or SQL syntax is hostile.
_KID = re.compile(r"^[A-Za-z0-9_=+/.:-]{1,256}$")
_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}
MAX_JWKS_BYTES = 1024 * 1024
# A verified token's identity is remembered this long (never past its `exp`), so a client
# sending the same token on every request is verified once per period, not per request.
VERIFIED_SECONDS = 30.0
VERIFIED_MAX = 10_000

Clock = Callable[[], float]
Fetch = Callable[[str, float], Awaitable[dict[str, Any]]]
log = get_logger("gateway.credentials")


def valid_kid(kid: object) -> bool:
    """A key id of safe characters, without `..`."""
    return isinstance(kid, str) and _KID.match(kid) is not None and ".." not in kid


def looks_like_jwt(credential: str) -> bool:
    """Whether `credential` has the compact JWS form (three base64url segments)."""
    return JWT_SHAPE.match(credential) is not None


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kty: str  # RSA, EC, OKP or oct
    key: Any  # a cryptography public key, or the HMAC secret bytes
    alg: str | None = None  # the JWK's own `alg`, when it names one

    def fits(self, alg: str) -> bool:
        return _FAMILY.get(alg[:2]) == self.kty and self.alg in (None, alg)


class JwksUnavailableError(Exception):
    """The JWKS URL could not be fetched or parsed (handled here, never raised to callers)."""


def _reject(message: str, reason: str) -> CredentialError:
    return CredentialError(message, reason=reason, code="invalid_token")


class StaticKeys:
    """Keys known at startup: a shared secret, PEM files or a JWKS file."""

    def __init__(self, keys: dict[str, VerificationKey], *, ignore_kid: bool = False) -> None:
        self._keys = keys
        self._ignore_kid = ignore_kid

    async def find(self, kid: str | None) -> VerificationKey | None:
        if self._ignore_kid:
            return next(iter(self._keys.values()))
        return select_key(self._keys, kid)


class RemoteJwks:
    """A JWKS URL: fetched at start, refreshed when stale or on an unknown kid, at most once
    per `jwks_refresh_seconds`; a failed fetch keeps the last good keys."""

    def __init__(self, settings: IssuerSettings, fetch: Fetch, clock: Clock) -> None:
        self._settings = settings
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def find(self, kid: str | None) -> VerificationKey | None:
        if self._is_stale() and self._may_refresh():
            if self._keys:
                self._refresh_in_background()
            else:
                await self.refresh()
        found = select_key(self._keys, kid)
        if found is None and kid is not None and self._may_refresh():
            await self.refresh()
            found = select_key(self._keys, kid)
        if not self._keys:
            raise ServiceUnavailableError(
                "The identity provider's signing keys are unavailable; try again shortly."
            )
        return found

    async def refresh(self) -> None:
        """Fetches the JWKS unless another fetch happened within the refresh interval."""
        async with self._lock:
            if not self._may_refresh():
                return
            self._attempted_at = self._clock()
            issuer = self._settings.issuer
            try:
                keys = parse_jwks(await self._fetch(self._url, self._settings.jwks_timeout))
            except JwksUnavailableError as exc:
                log.warning("jwks_refresh_failed", issuer=issuer, reason=str(exc),
                            kept_keys=len(self._keys))  # fmt: skip
                return
            if not keys:
                log.warning("jwks_refresh_failed", issuer=issuer, reason="no usable keys",
                            kept_keys=len(self._keys))  # fmt: skip
                return
            self._keys, self._fetched_at = keys, self._clock()
            log.info("jwks_refreshed", issuer=issuer, keys=len(keys))

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background

    @property
    def _url(self) -> str:
        return self._settings.jwks_url or ""

    def _is_stale(self) -> bool:
        return self._clock() - self._fetched_at >= self._settings.jwks_cache_seconds

    def _may_refresh(self) -> bool:
        return self._clock() - self._attempted_at >= self._settings.jwks_refresh_seconds

    def _refresh_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self.refresh())


KeySource = StaticKeys | RemoteJwks


def select_key(keys: Mapping[str, VerificationKey], kid: str | None) -> VerificationKey | None:
    """The key named by `kid`; without a kid, the issuer's only key if it has exactly one."""
    if kid is not None:
        return keys.get(kid)
    return next(iter(keys.values())) if len(keys) == 1 else None


def parse_jwks(document: Mapping[str, Any]) -> dict[str, VerificationKey]:
    """Usable signing keys by kid; symmetric, encryption and malformed entries are skipped."""
    keys: dict[str, VerificationKey] = {}
    entries = document.get("keys")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kid, kty = entry.get("kid"), entry.get("kty")
        if kty == "oct" or not isinstance(kid, str) or not valid_kid(kid):
            continue
        try:
            parsed = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            log.warning("jwks_key_skipped", kid=kid, kty=str(kty))
            continue
        alg = entry.get("alg")
        keys[kid] = VerificationKey(str(kty), parsed.key, alg if isinstance(alg, str) else None)
    return keys


def load_pem_key(data: bytes) -> VerificationKey:
    """A PEM public key as a verification key; raises ValueError for anything else."""
    key = serialization.load_pem_public_key(data)
    if isinstance(key, rsa.RSAPublicKey):
        return VerificationKey("RSA", key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return VerificationKey("EC", key)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return VerificationKey("OKP", key)
    raise ValueError("unsupported public key type")


def static_keys(settings: IssuerSettings) -> StaticKeys:
    """Reads the secret, PEM files or JWKS file once, at startup (raises ConfigError)."""
    if settings.secret is not None:
        secret = settings.secret.get_secret_value().encode()
        return StaticKeys({"": VerificationKey("oct", secret)}, ignore_kid=True)
    if settings.jwks_file is not None:
        path = settings.jwks_file
        try:
            return StaticKeys(parse_jwks(json.loads(path.read_bytes())))
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), [f"cannot read JWKS: {exc}"]) from exc
    keys = {}
    for kid, path in settings.public_keys.items():
        try:
            keys[kid] = load_pem_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), [f"cannot read PEM public key: {exc}"]) from exc
    return StaticKeys(keys)


class TokenVerifier:
    """Verifies JWTs against the configured issuers and returns what their claims grant."""

    def __init__(self, settings: AuthSettings, *, clock: Clock = time.monotonic) -> None:
        self._max_bytes = settings.max_token_bytes
        self._issuers = {i.issuer: i for i in settings.issuers}
        self._session: aiohttp.ClientSession | None = None
        self._sources: dict[str, KeySource] = {}
        # sha256 -> (who, until). A digest, not the token: a live bearer token stays in memory
        # only while its request runs. Natively the hash is under 1 µs (SHA-NI); callgrind
        # shows ~14k instructions because valgrind hides those instructions.
        self._verified: dict[bytes, tuple[Claimed, float]] = {}
        for issuer in settings.issuers:
            self._sources[issuer.issuer] = (
                RemoteJwks(issuer, self._fetch, clock) if issuer.jwks_url else static_keys(issuer)
            )

    async def start(self) -> None:
        """Opens the HTTP client for JWKS URLs and fetches each once (failures are logged)."""
        remote = [s for s in self._sources.values() if isinstance(s, RemoteJwks)]
        if not remote:
            return
        self._session = aiohttp.ClientSession()
        await asyncio.gather(*(source.refresh() for source in remote))

    async def close(self) -> None:
        for source in self._sources.values():
            if isinstance(source, RemoteJwks):
                await source.close()
        if self._session is not None:
            await self._session.close()

    async def verify(self, token: str) -> Claimed:
        """Returns the token's identity or raises `CredentialError` saying what is wrong
        (`ServiceUnavailableError` if its issuer's keys cannot be had).

        A token that verified is trusted again for up to `VERIFIED_SECONDS`, never past its
        `exp`: a signing key removed from a JWKS stops being accepted that much later."""
        if len(token) > self._max_bytes:
            raise _reject(
                f"The token is larger than this gateway accepts ({self._max_bytes} bytes).",
                "oversized",
            )
        digest = _digest(token)
        now = time.time()  # the clock pyjwt checks `exp` against
        cached = self._verified.get(digest)
        if cached is not None and now < cached[1]:
            return cached[0]
        claims, claimed = await self._verify(token)
        self._remember(digest, claimed, min(now + VERIFIED_SECONDS, _expiry(claims)))
        return claimed

    def recalled(self, credential: str) -> Claimed | None:
        """The identity `verify` would return from its cache of recently verified tokens
        (every check already passed), else None: then call `verify`."""
        cached = self._verified.get(_digest(credential))
        if cached is not None and time.time() < cached[1]:
            return cached[0]
        return None

    def _remember(self, digest: bytes, claimed: Claimed, until: float) -> None:
        if len(self._verified) >= VERIFIED_MAX:
            now = time.time()
            self._verified = {k: v for k, v in self._verified.items() if v[1] > now}
            if len(self._verified) >= VERIFIED_MAX:
                self._verified.clear()
        self._verified[digest] = (claimed, until)

    async def _verify(self, token: str) -> tuple[dict[str, Any], Claimed]:
        header, unverified = _unverified_parts(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise _reject("The token is unsigned (alg 'none'); sign it.", "alg_none")
        issuer = self._issuer_of(unverified)
        if alg not in issuer.algorithms:
            raise _reject("The token's signing algorithm is not accepted for its issuer.",
                          "algorithm_not_allowed")  # fmt: skip
        key = await self._key_for(issuer, header.get("kid"), alg)
        claims = _decode(token, key, alg, issuer)
        return claims, claimed_from(claims, issuer.claims, issuer.issuer)

    def _issuer_of(self, unverified: Mapping[str, Any]) -> IssuerSettings:
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _reject("The token's issuer is not trusted by this gateway.", "wrong_issuer")
        return issuer

    async def _key_for(self, issuer: IssuerSettings, kid: Any, alg: str) -> VerificationKey:
        if kid is not None and not valid_kid(kid):
            raise _reject("The token's key id (kid) is malformed.", "malformed_kid")
        key = await self._sources[issuer.issuer].find(kid)
        if key is None and kid is None:
            raise _reject("The token names no key id (kid) and its issuer has several keys.",
                          "missing_kid")  # fmt: skip
        if key is None:
            raise _reject("The token's signing key (kid) is not one of its issuer's keys.",
                          "unknown_kid")  # fmt: skip
        if not key.fits(alg):
            raise _reject("The token's signing algorithm does not match its key.",
                          "algorithm_not_allowed")  # fmt: skip
        return key

    async def _fetch(self, url: str, seconds: float) -> dict[str, Any]:
        if self._session is None:
            raise JwksUnavailableError("the verifier is not started")
        try:
            async with self._session.get(
                url, timeout=aiohttp.ClientTimeout(total=seconds), allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise JwksUnavailableError(f"status {response.status}")
                raw = await response.content.read(MAX_JWKS_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksUnavailableError(type(exc).__name__) from exc
        if len(raw) > MAX_JWKS_BYTES:
            raise JwksUnavailableError("document too large")
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise JwksUnavailableError("not JSON") from exc
        if not isinstance(document, dict):
            raise JwksUnavailableError("not a JSON object")
        return document


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _expiry(claims: Mapping[str, Any]) -> float:
    """The token's `exp` (verified by pyjwt when present), else never."""
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else math.inf


def _unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not looks_like_jwt(token):
        raise _reject("The token is malformed: it is not a compact JWT.", "malformed")
    try:
        header = jwt.get_unverified_header(token)
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise _reject("The token is malformed: its header or payload is not valid.",
                      "malformed") from exc  # fmt: skip
    return header, payload


# Most specific first: several pyjwt errors subclass others.
_DECODE_ERRORS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "The token has expired; get a new one.", "expired"),
    (jwt.ImmatureSignatureError, "The token is not yet valid (nbf or iat is in the future).",
     "not_yet_valid"),
    (jwt.InvalidAudienceError, "The token's audience (aud) does not match this gateway.",
     "wrong_audience"),
    (jwt.InvalidIssuerError, "The token's issuer is not trusted by this gateway.", "wrong_issuer"),
    (jwt.InvalidSignatureError, "The token's signature is invalid.", "bad_signature"),
    (jwt.InvalidAlgorithmError, "The token's signing algorithm is not accepted.",
     "algorithm_not_allowed"),
    (jwt.InvalidIssuedAtError, "The token's issued-at time (iat) is invalid.", "bad_iat"),
)  # fmt: skip


def _decode(token: str, key: VerificationKey, alg: str, issuer: IssuerSettings) -> dict[str, Any]:
    try:
        return jwt.decode(
            token, key.key, algorithms=[alg], audience=list(issuer.audience),
            issuer=issuer.issuer, leeway=issuer.leeway,
            options={"require": list(issuer.required_claims)},
        )  # fmt: skip
    except jwt.MissingRequiredClaimError as exc:
        raise _reject(f"The token lacks the required claim {exc.claim!r}.",
                      "missing_claim") from exc  # fmt: skip
    except jwt.PyJWTError as exc:
        for kind, message, reason in _DECODE_ERRORS:
            if isinstance(exc, kind):
                raise _reject(message, reason) from exc
        raise _reject("The token is invalid.", "invalid") from exc
