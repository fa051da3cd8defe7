"""The project's own recognizers: credentials, passwords, addresses, birth dates, phone formats.

Owns the patterns, the context words some of them need, and the validators (checksums,
entropy, Luhn, IBAN mod 97) that keep look-alikes out. Plain `re` and the standard library
only: `gateway.redaction_worker` wraps `find_matches` in a Presidio recognizer. Must not import
Presidio, log or keep the text it scans.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CONTEXT_WINDOW = 100
"""Characters before a match searched for the context words a detector needs."""

Validator = Callable[[str], float | None]
"""Returns the score for a candidate, or None to drop it."""


@dataclass(frozen=True, slots=True)
class Detector:
    """One pattern: `group` selects the sensitive part; `context` words must precede it."""

    entity: str
    name: str
    pattern: re.Pattern[str]
    score: float
    group: int = 0
    validate: Validator | None = None
    context: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Match:
    start: int
    end: int
    entity: str
    score: float
    detector: str


def find_matches(text: str, entities: Collection[str] | None = None) -> list[Match]:
    """Every detector hit in `text` (overlaps included), for `entities` or all of them."""
    found = []
    lowered: str | None = None
    for detector in DETECTORS:
        if entities is not None and detector.entity not in entities:
            continue
        for hit in detector.pattern.finditer(text):
            start, end = hit.span(detector.group)
            if detector.context:
                lowered = lowered if lowered is not None else text.lower()
                if not _has_context(lowered, start, detector.context):
                    continue
            score = detector.validate(text[start:end]) if detector.validate else detector.score
            if score is not None:
                found.append(Match(start, end, detector.entity, score, detector.name))
    return found


def _has_context(lowered: str, start: int, words: tuple[str, ...]) -> bool:
    window = lowered[max(0, start - CONTEXT_WINDOW) : start]
    return any(word in window for word in words)


# --- validators -------------------------------------------------------------------------------


def shannon_entropy(value: str) -> float:
    """Bits per character of `value`."""
    if not value:
        return 0.0
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def char_classes(value: str) -> int:
    """How many of lower case, upper case, digits and other characters `value` uses."""
    return sum((
        any(c.islower() for c in value),
        any(c.isupper() for c in value),
        any(c.isdigit() for c in value),
        any(not c.isalnum() for c in value),
    ))  # fmt: skip


def base62_crc32(payload: str) -> str:
    """GitHub's token checksum: CRC32 of the payload in base62, left-padded to 6 characters."""
    number = zlib.crc32(payload.encode())
    digits = ""
    while number:
        number, rest = divmod(number, 62)
        digits = BASE62[rest] + digits
    return digits.rjust(6, "0")


def github_checksum_valid(token: str) -> bool:
    """The last 6 characters are the checksum of the random part before them."""
    body = token.rsplit("_", 1)[-1]
    return len(body) > 6 and base62_crc32(body[:-6]) == body[-6:]


def luhn_valid(number: str) -> bool:
    """The Luhn (mod 10) check used by payment cards; spaces and dashes are ignored."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 12:
        return False
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616 mod-97 check; spaces are ignored."""
    compact = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{10,30}", compact):
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _github(token: str) -> float:
    # The prefix alone is distinctive, so a bad checksum lowers the score rather than
    # dropping the match: a policy that wants checksum-valid tokens only sets threshold 0.9.
    return 1.0 if github_checksum_valid(token) else 0.6


def _card(number: str) -> float | None:
    return 0.8 if luhn_valid(number) else None


def _jwt(token: str) -> float | None:
    header = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError):
        return 0.6
    return 0.95 if isinstance(decoded, dict) and "alg" in decoded else 0.6


def _mixed_base64(value: str) -> float | None:
    return 0.9 if char_classes(value) >= 3 and shannon_entropy(value) >= 4.0 else None


def _hex_key(value: str) -> float | None:
    has_digit = any(c.isdigit() for c in value)
    return 0.8 if has_digit and any(c.isalpha() for c in value) else None


def _openai(value: str) -> float | None:
    if value.startswith("sk-ant-"):
        return None
    return 0.9 if len(value) >= 40 and char_classes(value[3:]) >= 2 else None


def _assigned_secret(value: str) -> float | None:
    if value.startswith(("${", "{{", "%(", "$(")) or value.lower() in _NOT_SECRETS:
        return None
    if char_classes(value) >= 2 and shannon_entropy(value) >= 2.5:
        return 0.8
    return None


def _nearby_secret(value: str) -> float | None:
    if char_classes(value) >= 3 and shannon_entropy(value) >= 3.5:
        return 0.7
    return None


_NOT_SECRETS = frozenset({"required", "optional", "password", "changeme", "redacted", "none"})

# --- detectors --------------------------------------------------------------------------------

_STREET_SUFFIXES = (
    "Alley|Avenue|Ave|Branch|Bridge|Brooks?|Burgs?|Bypass|Camp|Canyon|Cape|Causeway|Centers?|"
    "Circles?|Cir|Cliffs?|Club|Common|Corners?|Course|Courts?|Ct|Coves?|Creek|Crescent|Crest|"
    "Crossing|Crossroad|Curve|Dale|Dam|Divide|Drives?|Dr|Estates?|Expressway|Extensions?|Falls?|"
    "Ferry|Fields?|Flats?|Fords?|Forest|Forges?|Forks?|Fort|Freeway|Gardens?|Gateway|Glens?|"
    "Greens?|Groves?|Harbors?|Haven|Heights|Highway|Hwy|Hills?|Hollow|Inlet|Islands?|Isle|"
    "Junctions?|Keys?|Knolls?|Lakes?|Land|Landing|Lane|Ln|Lights?|Loaf|Locks?|Lodge|Loop|Mall|"
    "Manors?|Meadows?|Mews|Mills?|Mission|Motorway|Mount|Mountains?|Neck|Orchard|Oval|Overpass|"
    "Parks?|Parkways?|Pkwy|Pass|Passage|Path|Pike|Pines?|Place|Pl|Plains?|Plaza|Points?|Ports?|"
    "Prairie|Radial|Ramp|Ranch|Rapids?|Rest|Ridges?|River|Roads?|Rd|Route|Row|Rue|Run|Shoals?|"
    "Shores?|Skyway|Springs?|Spurs?|Squares?|Sq|Station|Stravenue|Stream|Streets?|St|Summit|"
    "Terrace|Throughway|Trace|Track|Trafficway|Trail|Tunnel|Turnpike|Underpass|Unions?|Valleys?|"
    "Via|Viaduct|Views?|Villages?|Ville|Vista|Walks?|Wall|Ways?|Wells?|Boulevard|Blvd"
)
_MONTHS = (
    "Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    "Sep(?:t|tember)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?"
)
_STATES = (
    "A[AEKLPRSZ]|C[AOT]|D[CE]|F[LM]|G[AU]|HI|I[ADLN]|K[SY]|LA|M[ADEHINOPST]|N[CDEHJMVY]|"
    "O[HKR]|P[ARW]|RI|S[CD]|T[NX]|UT|V[AIT]|W[AIVY]"
)


def _d(entity: str, name: str, pattern: str, score: float, **extra: object) -> Detector:
    flags = re.DOTALL if entity == "PRIVATE_KEY" else 0
    return Detector(entity, name, re.compile(pattern, flags), score, **extra)  # type: ignore[arg-type]


DETECTORS: tuple[Detector, ...] = (
    _d("AWS_ACCESS_KEY_ID", "aws_access_key_id",
       r"\b((?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA|AGPA|ANPA|ANVA|APKA|AIPA)[A-Z2-7]{16})\b", 0.95),
    _d("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key",
       r"(?<![A-Za-z0-9/+=])([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])", 0.9,
       validate=_mixed_base64, context=("aws", "secret")),
    _d("GCP_API_KEY", "gcp_api_key", r"\b(AIza[0-9A-Za-z_\-]{35})(?![0-9A-Za-z_\-])", 0.95),
    _d("AZURE_KEY", "azure_storage_key", r"(?i)\bAccountKey=([A-Za-z0-9+/]{86}==)", 0.95,
       group=1),
    _d("AZURE_KEY", "azure_sas_key", r"(?i)\bSharedAccessKey=([A-Za-z0-9+/]{43}=)", 0.95, group=1),
    _d("AZURE_KEY", "azure_api_key", r"\b([0-9a-f]{32}|[A-Za-z0-9]{84})\b", 0.8,
       validate=_hex_key, context=("azure", "ocp-apim", "api-key", "cognitive")),
    _d("GITHUB_TOKEN", "github_classic", r"\b(gh[pousr]_[A-Za-z0-9]{36})\b", 1.0,
       validate=_github),
    _d("GITHUB_TOKEN", "github_fine_grained", r"\b(github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})\b",
       1.0, validate=_github),
    _d("SLACK_TOKEN", "slack_token", r"\b(xox[abposre]-[A-Za-z0-9-]{10,250})", 0.95),
    _d("SLACK_TOKEN", "slack_webhook",
       r"https://hooks\.slack\.com/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/[A-Za-z0-9]+", 0.95),
    _d("STRIPE_KEY", "stripe_key",
       r"\b((?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,247}|whsec_[0-9A-Za-z]{32,})\b", 0.95),
    _d("ANTHROPIC_API_KEY", "anthropic_key", r"\b(sk-ant-[a-z]+\d\d-[A-Za-z0-9_\-]{80,120})",
       0.98),
    _d("OPENAI_API_KEY", "openai_key", r"\b(sk-[A-Za-z0-9_\-]{20,200})(?![A-Za-z0-9_\-])", 0.9,
       validate=_openai),
    _d("PRIVATE_KEY", "pem_private_key",
       r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:.*?-----END (?:[A-Z0-9]+ )*"
       r"PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s:,-]*)", 1.0),
    _d("JWT", "jwt", r"\b(eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,})", 0.95,
       validate=_jwt),
    _d("PASSWORD", "url_password",
       r"\b[A-Za-z][A-Za-z0-9+.\-]{1,20}://[^\s:/@?#]{1,100}:([^\s@/?#]{1,200})@", 0.9, group=1),
    _d("PASSWORD", "connection_string_password",
       r"(?i)\b(?:password|pwd)\s*=\s*([^;\s'\"]{1,200})", 0.85, group=1),
    _d("SECRET", "assigned_secret",
       r"(?i)\b(?:password|passwd|passphrase|secret|token|api[_-]?key|apikey|access[_-]?key|"
       r"private[_-]?key|client[_-]?secret|auth[_-]?token)[\"']?\s*(?:[:=]|:=|=>|\bis\b)\s*"
       r"[\"']?([^\s\"',;<>]{8,200})", 0.8, group=1, validate=_assigned_secret),
    _d("SECRET", "secret_near_keyword",
       r"(?i)\b(?:password|secret|token|key|credential)s?\b[^\n]{0,40}?(?<![A-Za-z0-9+/_=.-])"
       r"([A-Za-z0-9+/_\-=.]{20,200})", 0.7, group=1, validate=_nearby_secret),
    _d("STREET_ADDRESS", "street_line",
       rf"\b\d{{1,6}}(?: [A-Z][a-z]+){{1,4}} (?:{_STREET_SUFFIXES})\b\.?"
       r"(?: (?:Apt\.|Suite|Unit) \d{1,5})?", 0.75),
    _d("STREET_ADDRESS", "city_state_zip",
       rf"\b[A-Z][a-z]+(?: [A-Z][a-z]+){{0,3}}, (?:{_STATES}) \d{{5}}(?:-\d{{4}})?\b", 0.75),
    _d("STREET_ADDRESS", "military_address",
       r"\b(?:(?:USNS|USNV|USS|USCGC) [A-Z][a-z]+|PSC \d{4}, Box \d{4}|Unit \d{4} Box \d{4})"
       r",?\s+(?:APO|FPO|DPO) (?:AA|AE|AP) \d{5}\b", 0.8),
    _d("DATE_OF_BIRTH", "date_of_birth",
       r"\b(\d{4}-\d{2}-\d{2}|\d{1,2}[/.-]\d{1,2}[/.-]\d{4}"
       rf"|(?:{_MONTHS}) \d{{1,2}},? \d{{4}}|\d{{1,2}} (?:{_MONTHS}) \d{{4}})\b", 0.85,
       context=("born", "birth", "dob", "d.o.b", "birthday")),
    _d("CREDIT_CARD", "luhn_card", r"(?<![\w-])([2-6]\d{3}(?:[ -]?\d){9,15})(?![\d-])", 0.8,
       group=1, validate=_card),
    _d("PHONE_NUMBER", "bare_phone", r"(?<![\w+.-])([2-9]\d{9})(?![\w-])", 0.6, group=1,
       context=("phone", "call", "cell", "mobile", "tel", "reach", "text me", "fax")),
    _d("PHONE_NUMBER", "nanp_phone",
       r"(?<![\w+.-])(?:(?:\+1|001)[-. ])?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[-.])[2-9]\d{2}[-.]\d{4}"
       r"(?:x\d{1,5})?(?![\w-])", 0.6),
)  # fmt: skip

SECRET_DETECTOR_ENTITIES = frozenset(d.entity for d in DETECTORS)
