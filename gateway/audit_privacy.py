"""What an audit event may say about people and secrets: pseudonyms, networks, agent families,
and the scrubber every audit sink shares.

Owns keyed-HMAC pseudonyms with key rotation, address truncation (IPv4 /24, IPv6 /48),
user-agent families, and `scrub`/`scrub_text`, which remove anything shaped like an email,
key, token, long secret or full address. Must not write anything, nor keep a credential or a
text that had something to remove.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.config import AuditSettings

EPHEMERAL_KEY_ID = "ephemeral"
CHAIN_FIELDS = ("gateway.audit.stream", "gateway.audit.seq", "gateway.audit.prev_hash")


class Pseudonymizer:
    """Keyed HMAC pseudonyms: `ps_` + 24 hex digits, stable per key, meaningless without it."""

    def __init__(
        self, keys: Sequence[tuple[str, bytes]], overlap_until: datetime | None = None
    ) -> None:
        self.keys = tuple(keys) or ((EPHEMERAL_KEY_ID, secrets.token_bytes(32)),)
        self.overlap_until = overlap_until

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> Pseudonymizer:
        keys = [(k.id, k.key.get_secret_value().encode()) for k in settings.pseudonym_keys]
        return cls(keys, settings.pseudonym_overlap_until)

    @property
    def key_id(self) -> str:
        return self.keys[0][0]

    def user(self, subject: str) -> str:
        return _pseudonym(self.keys[0][1], "user", subject)

    def tenant(self, tenant: str) -> str:
        return _pseudonym(self.keys[0][1], "tenant", tenant)

    def credential(self, secret: str) -> str:
        """A fingerprint of a presented credential, to count failures against one key."""
        return "kf_" + _hmac(self.keys[0][1], "credential", secret)[3:]

    def all_users(self, subject: str) -> list[tuple[str, str]]:
        """(key id, pseudonym) under every configured key: what the SOC searches for."""
        return [(kid, _hmac(key, "user", subject)) for kid, key in self.keys]

    def older_users(self, subject: str, now: datetime) -> list[str]:
        """Pseudonyms under the previous keys while the rotation overlap lasts."""
        if not self.overlapping(now):
            return []
        return [_hmac(key, "user", subject) for _, key in self.keys[1:]]

    def overlapping(self, now: datetime) -> bool:
        """Whether the rotation overlap lasts at `now` (events name users under older keys)."""
        return self.overlap_until is not None and now < aware(self.overlap_until)


def _hmac(key: bytes, domain: str, value: str) -> str:
    digest = hmac.new(key, f"{domain}:{value}".encode(), hashlib.sha256).hexdigest()
    return "ps_" + digest[:24]


@functools.lru_cache(maxsize=8192)
def _pseudonym(key: bytes, domain: str, value: str) -> str:
    """`_hmac` remembered for the identities seen lately: a principal sends many requests.
    Not for credentials, which must not linger in memory."""
    return _hmac(key, domain, value)


def aware(moment: datetime) -> datetime:
    """`moment`, read as UTC when it carries no timezone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@functools.lru_cache(maxsize=4096)
def truncate_address(address: str) -> str | None:
    """The client's network, never its address: IPv4 /24, IPv6 /48 (as `net/len`)."""
    try:
        ip = ipaddress.ip_network(address.strip().split("%")[0], strict=False).network_address
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


_AGENTS = (("OpenAI/Python", "openai-python"), ("OpenAI/JS", "openai-node"), ("curl/", "curl"),
           ("python-requests/", "python-requests"), ("python-httpx/", "python-httpx"),
           ("aiohttp/", "aiohttp"), ("Go-http-client/", "go"), ("okhttp/", "okhttp"),
           ("PostmanRuntime/", "postman"), ("Edg/", "edge"), ("Firefox/", "firefox"),
           ("Chrome/", "chrome"), ("Safari/", "safari"), ("Mozilla/", "browser"))  # fmt: skip


@functools.lru_cache(maxsize=1024)
def user_agent_family(agent: str | None) -> str | None:
    """A bounded family name; the free-text header itself is never logged. Remembered for the
    agents seen lately (as `truncate_address` is for addresses): clients repeat theirs."""
    if not agent:
        return None
    for marker, family in _AGENTS:
        if marker in agent:
            return family
    return "other"


_SHAPES = {
    "key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
    r"|\b(?:sk|pk|rk|gw|ghp|gho|ghu|ghs|ghr|glpat|xox[abposr]|AKIA|ASIA|AIza|github_pat|"
    r"sk_live|sk_test|rk_live)[A-Za-z0-9_\-]{12,}",
    "email": r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+",
    "token": r"(?i:\b(?:bearer|basic)\s+[A-Za-z0-9._~+/=\-]+)"
    r"|\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*",
    "address": r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:[0-9A-Fa-f]{1,4}:){4,7}[0-9A-Fa-f]{1,4}\b",
    "secret": r"[A-Za-z0-9_\-+/=]{32,}",
}
_SCRUB = re.compile("|".join(f"(?P<{name}>{shape})" for name, shape in _SHAPES.items()), re.S)
# Pseudonyms, fingerprints and the gateway's own request ids (`req_` and 32 lower-case hex
# digits): no shape matches them but `secret`, which keeps a run without upper case. A request
# id is new on every request, so it would miss the cache below and push out what it holds.
_OURS = re.compile(r"^(?:(?:ps|kf)_[0-9a-f]{24}|req_[0-9a-f]{32})$")
_DIGIT = re.compile(r"[0-9]")
_TRUSTED = frozenset({"@timestamp", "source.address", *CHAIN_FIELDS})
_PLAIN = frozenset({int, float, bool, type(None)})
# Texts the scrubber left unchanged lately (model names, paths, actions): most strings of an
# event repeat on every request and the pattern costs a microsecond each. Bounded, and never
# holds a text that had anything to remove.
_CLEAN: set[str] = set()
_CLEAN_TEXTS = 4096


def scrub_text(text: str) -> str:
    """Removes anything shaped like an email, key, token, long secret or full address."""
    if len(text) < 7 or text in _CLEAN or _OURS.match(text):
        return text  # shorter than any shape (e.g. 1.2.3.4), found clean, or one of ours
    scrubbed = _SCRUB.sub(_mark, text)
    if scrubbed == text and len(text) <= 200:
        _remember_clean(text)
    return scrubbed


def _remember_clean(text: str) -> None:
    if len(_CLEAN) >= _CLEAN_TEXTS:
        _CLEAN.clear()
    _CLEAN.add(text)


def _mark(match: re.Match[str]) -> str:
    kind = match.lastgroup or "secret"
    if kind != "secret":
        return f"[{kind}]"
    # Long runs mixing upper case, lower case and digits are secrets; hex ids are not.
    # (The run is ASCII: it has an upper-case letter iff lower() changes it, and vice versa.)
    token = match.group(0)
    mixed = token.lower() != token and token.upper() != token
    return "[secret]" if mixed and _DIGIT.search(token) else token


def scrub(value: Any, key: str = "") -> Any:
    """The final pass every sink shares, over every string in the event."""
    if key in _TRUSTED:
        return value
    kind = type(value)
    if kind is str:
        return scrub_text(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {k: scrub(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value
