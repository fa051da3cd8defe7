"""A labelled, seeded set of personal data, secrets and look-alikes, generated at run time.

Nothing here is a real value: names and numbers come from Faker with a fixed seed, and
credential-shaped strings are assembled from random characters in their public formats (with
valid checksums where the format has one), so nothing secret-looking is committed to the tree.
"""

from __future__ import annotations

import base64
import json
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from faker import Faker

from gateway.secret_recognizers import base62_crc32, iban_valid, luhn_valid

ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"


@dataclass(frozen=True)
class Sample:
    text: str
    kind: str  # the entity type seeded, or "LOOKALIKE" for a value that must survive
    value: str

    @property
    def sensitive(self) -> bool:
        return self.kind != "LOOKALIKE"

    @property
    def span(self) -> tuple[int, int]:
        start = self.text.index(self.value)
        return start, start + len(self.value)


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def secret_makers(rng: random.Random) -> dict[str, Callable[[], str]]:
    """One generator per secret entity type, each in the provider's public format."""

    def github_classic() -> str:
        body = _rand(rng, ALNUM, 30)
        return f"gh{rng.choice('pousr')}_{body}{base62_crc32(body)}"

    def github_fine() -> str:
        tail = _rand(rng, ALNUM, 53)
        return f"github_pat_{_rand(rng, ALNUM, 22)}_{tail}{base62_crc32(tail)}"

    def jwt() -> str:
        def part(obj: dict) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

        sig = base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("=")
        claims = {"sub": str(rng.randint(1, 10**6)), "iat": rng.randint(10**9, 2 * 10**9)}
        return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{sig}"

    def pem() -> str:
        lines = [base64.b64encode(rng.randbytes(48)).decode() for _ in range(4)]
        kind = rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY"])
        return f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----"

    def aws_secret() -> str:
        while True:
            value = _rand(rng, B64, 40)
            if any(c.isdigit() for c in value) and any(c.isupper() for c in value):
                return value

    return {
        "AWS_ACCESS_KEY_ID": lambda: "AKIA" + _rand(rng, string.ascii_uppercase + "234567", 16),
        "AWS_SECRET_ACCESS_KEY": aws_secret,
        "GCP_API_KEY": lambda: "AIza" + _rand(rng, ALNUM + "-_", 35),
        "AZURE_KEY": lambda: base64.b64encode(rng.randbytes(64)).decode(),
        "GITHUB_TOKEN": lambda: rng.choice([github_classic, github_fine])(),
        "SLACK_TOKEN": lambda: (
            f"xoxb-{rng.randint(10**10, 10**11)}-"
            f"{rng.randint(10**10, 10**11)}-{_rand(rng, ALNUM, 24)}"
        ),
        "STRIPE_KEY": lambda: f"sk_{rng.choice(['live', 'test'])}_{_rand(rng, ALNUM, 24)}",
        "OPENAI_API_KEY": lambda: "sk-proj-" + _rand(rng, ALNUM + "_-", 48),
        "ANTHROPIC_API_KEY": lambda: "sk-ant-api03-" + _rand(rng, ALNUM + "_-", 93) + "AA",
        "PRIVATE_KEY": pem,
        "JWT": jwt,
        "PASSWORD": lambda: _rand(rng, ALNUM, 10) + rng.choice("!%*") + str(rng.randint(10, 99)),
        "SECRET": lambda: _rand(rng, ALNUM, 32),
    }


# Sentences around a value: {v} is the value. Secrets get their own, more technical ones.
_TEMPLATES = {
    "PERSON": ["Please forward the contract to {v} before the meeting.",
               "Yesterday {v} asked me to review the quarterly numbers.",
               "I had lunch with {v} and we talked about the new project.",
               "Can you draft a thank-you note to {v} for the help last week?",
               "The ticket was opened by {v}, who reported the login problem."],
    "EMAIL_ADDRESS": ["Send the invoice to {v} when it is ready.",
                      "My email is {v} if you need anything."],
    "PHONE_NUMBER": ["You can reach me at {v} during office hours.",
                     "Her phone number is {v}, call after five."],
    "US_SSN": ["My social security number is {v} for the form.",
               "SSN: {v} was entered twice by mistake."],
    "CREDIT_CARD": ["Charge the card {v} for the renewal.",
                    "My credit card number is {v}, expiry next year."],
    "IBAN_CODE": ["Wire the refund to IBAN {v} please.",
                  "Our bank account is {v} at the main branch."],
    "IP_ADDRESS": ["The server at {v} stopped answering last night.",
                   "Requests from {v} were blocked by the firewall."],
    "STREET_ADDRESS": ["Ship the package to {v} by Friday.",
                       "Our new office is at {v}, on the second floor."],
    "DATE_OF_BIRTH": ["I was born on {v} in a small town.",
                      "Date of birth: {v}, please update the record."],
    "LOOKALIKE": ["Your order number {v} has shipped.",
                  "The build {v} passed all checks.",
                  "Reference {v} is attached to the ticket.",
                  "We upgraded to version {v} on Monday."],
}  # fmt: skip
_SECRET_TEMPLATES = {
    "PASSWORD": [
        "Connect with postgres://app_user:{v}@db.internal:5432/orders and run it.",
        "Server=sql01;Database=crm;User Id=svc;Password={v};",
    ],
    "SECRET": ["Set token = {v} in the settings file.", "The api_key: {v} stopped working."],
    "AWS_SECRET_ACCESS_KEY": ["aws_secret_access_key = {v}", "My AWS secret key is {v} now."],
    "AZURE_KEY": ["DefaultEndpointsProtocol=https;AccountName=store1;AccountKey={v};"],
}
_GENERIC_SECRET = ["Why does this fail? My key is {v} and the call returns 401.",
                   "Here is the config:\n{v}\nWhat is wrong?"]  # fmt: skip


def _lookalikes(rng: random.Random, fake: Faker) -> list[str]:
    card = fake.credit_card_number(card_type="visa16")
    while luhn_valid(card):
        card = card[:-1] + str((int(card[-1]) + 1) % 10)
    iban = fake.iban()
    while iban_valid(iban):
        iban = iban[:-1] + str((int(iban[-1]) + 1) % 10)
    return [
        f"ORD-{rng.randint(10000, 99999)}-{rng.randint(1000, 9999)}",
        f"#{rng.randint(1000000, 9999999)}",
        str(uuid.UUID(int=rng.getrandbits(128))),
        f"{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
        f"v{rng.randint(1, 4)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}-rc{rng.randint(1, 5)}",
        card,
        iban,
        _rand(rng, "0123456789abcdef", 40),
        f"INV{rng.randint(2019, 2025)}{rng.randint(10000, 99999)}",
        f"1Z{_rand(rng, string.ascii_uppercase + string.digits, 16)}",
    ]


def _value(kind: str, fake: Faker, rng: random.Random) -> str:
    if kind == "PERSON":
        return fake.name()
    if kind == "EMAIL_ADDRESS":
        return fake.email()
    if kind == "PHONE_NUMBER":
        return fake.phone_number()
    if kind == "US_SSN":
        return fake.ssn()
    if kind == "CREDIT_CARD":
        return fake.credit_card_number(
            card_type=rng.choice(["visa16", "mastercard", "amex", "discover"])
        )
    if kind == "IBAN_CODE":
        iban = fake.iban()
        return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 \
            else iban  # fmt: skip
    if kind == "IP_ADDRESS":
        return fake.ipv4() if rng.random() < 0.7 else fake.ipv6()
    if kind == "STREET_ADDRESS":
        return fake.address().replace("\n", ", ")
    if kind == "DATE_OF_BIRTH":
        day = fake.date_of_birth(minimum_age=18, maximum_age=90)
        style = rng.choice(["%Y-%m-%d", "%m/%d/%Y", "%B %d, %Y", "%d %B %Y"])
        return day.strftime(style)
    raise ValueError(kind)


PII_KINDS = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "CREDIT_CARD", "IBAN_CODE",
             "IP_ADDRESS", "STREET_ADDRESS", "DATE_OF_BIRTH")  # fmt: skip


def samples(seed: int = 20240601, per_kind: int = 40) -> list[Sample]:
    """`per_kind` texts for every PII kind and secret kind, and as many look-alikes overall."""
    rng = random.Random(seed)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    out = []
    for kind in PII_KINDS:
        for _ in range(per_kind):
            value = _value(kind, fake, rng)
            out.append(Sample(rng.choice(_TEMPLATES[kind]).format(v=value), kind, value))
    for kind, make in secret_makers(rng).items():
        for _ in range(per_kind):
            value = make()
            template = rng.choice(_SECRET_TEMPLATES.get(kind, _GENERIC_SECRET))
            out.append(Sample(template.format(v=value), kind, value))
    for _ in range(per_kind * 2):
        for value in _lookalikes(rng, fake):
            template = rng.choice(_TEMPLATES["LOOKALIKE"])
            out.append(Sample(template.format(v=value), "LOOKALIKE", value))
    return out


_FILLER = (
    "Thanks for the quick answer earlier. I am trying to summarise the notes from our "
    "planning session so the team can pick up the open items tomorrow morning. "
)


def prompt_of_size(size: int, seed: int) -> tuple[str, list[Sample]]:
    """A prompt of about `size` characters with seeded values mixed into plain prose."""
    pool = [s for s in samples(seed, per_kind=3) if s.sensitive]
    random.Random(seed).shuffle(pool)
    text, used = "", []
    for sample in pool:
        if len(text) + len(sample.text) + 1 > size:
            break
        text += sample.text + " "
        used.append(sample)
        if len(text) < size - len(_FILLER):
            text += _FILLER[: max(0, min(len(_FILLER), size - len(text) - 200))]
    return (text + _FILLER)[:size], used
