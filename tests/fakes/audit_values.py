"""Keys, pseudonymizers and credential-shaped values for the audit tests, generated from a
fixed seed at test time (never committed literals)."""

from __future__ import annotations

import base64
import json
import random
import string
from datetime import datetime

from gateway.audit_privacy import Pseudonymizer

RNG = random.Random(7)
KEY_A = "".join(RNG.choices(string.ascii_letters, k=40))
KEY_B = "".join(RNG.choices(string.ascii_letters, k=40))


def names(overlap: datetime | None = None) -> Pseudonymizer:
    return Pseudonymizer([("k2", KEY_A.encode()), ("k1", KEY_B.encode())], overlap)


def secret(prefix: str, length: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return prefix + "".join(RNG.choices(alphabet, k=length))


def fake_jwt() -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256'})}.{part({'sub': 'x' * 12})}.{secret('', 43)}"
