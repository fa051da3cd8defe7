"""The project's own recognizers: every secret kind is found, validators reject look-alikes."""

from __future__ import annotations

import random

import pytest

from gateway.redaction_rules import SECRET_ENTITIES
from gateway.secret_recognizers import (
    SECRET_DETECTOR_ENTITIES,
    base62_crc32,
    find_matches,
    github_checksum_valid,
    iban_valid,
    luhn_valid,
    shannon_entropy,
)
from tests.fakes.pii_samples import secret_makers


def _found(text: str, entity: str) -> list[str]:
    return [text[m.start : m.end] for m in find_matches(text) if m.entity == entity]


def test_every_secret_entity_has_a_detector():
    assert set(SECRET_ENTITIES) <= SECRET_DETECTOR_ENTITIES


@pytest.mark.parametrize("entity", sorted(set(SECRET_ENTITIES) - {"PASSWORD", "SECRET",
                                                                  "AWS_SECRET_ACCESS_KEY",
                                                                  "AZURE_KEY"}))  # fmt: skip
def test_generated_secret_is_found_in_prose(entity):
    makers = secret_makers(random.Random(11))
    for _ in range(20):
        value = makers[entity]()
        text = f"Why does this fail? My key is {value} and the call returns 401."
        assert value in _found(text, entity)


def test_context_bound_secrets_need_their_keyword():
    makers = secret_makers(random.Random(3))
    aws = makers["AWS_SECRET_ACCESS_KEY"]()
    assert _found(f"aws_secret_access_key = {aws}", "AWS_SECRET_ACCESS_KEY") == [aws]
    assert _found(f"the checksum was {aws} yesterday", "AWS_SECRET_ACCESS_KEY") == []
    azure = makers["AZURE_KEY"]()
    assert _found(f"AccountName=a;AccountKey={azure};", "AZURE_KEY") == [azure]


def test_passwords_in_urls_and_connection_strings_keep_the_rest():
    text = "use postgres://app:S3cret-Pass@db:5432/x or Server=a;Password=Hunter22x;Database=b"
    assert _found(text, "PASSWORD") == ["S3cret-Pass", "Hunter22x"]


@pytest.mark.parametrize(("text", "found"), [
    ("password: Tr0ub4dor&3x", ["Tr0ub4dor&3x"]),
    ("token=9fQ2xLk7PzR4mW8vN1sT6yB3", ["9fQ2xLk7PzR4mW8vN1sT6yB3"]),
    ("password: required", []),
    ("password = ${DB_PASSWORD}", []),
    ("the token field is optional", []),
])  # fmt: skip
def test_assigned_secrets_need_entropy(text, found):
    assert _found(text, "SECRET") == found


def test_github_checksum():
    body = "a" * 30
    token = f"ghp_{body}{base62_crc32(body)}"
    assert github_checksum_valid(token)
    assert not github_checksum_valid(token[:-1] + ("0" if token[-1] != "0" else "1"))
    scores = {m.score for m in find_matches(f"x {token} y") if m.entity == "GITHUB_TOKEN"}
    assert scores == {1.0}
    broken = f"ghp_{body}ZZZZZZ"
    assert {m.score for m in find_matches(broken)} == {0.6}


def test_luhn_and_iban_checks():
    assert luhn_valid("4111 1111 1111 1111")
    assert not luhn_valid("4111 1111 1111 1112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")


def test_invalid_card_number_is_not_a_card():
    assert _found("order 4111111111111112 shipped", "CREDIT_CARD") == []
    assert _found("card 4111111111111111 charged", "CREDIT_CARD") == ["4111111111111111"]


def test_look_alikes_survive():
    text = ("build v3.12.4-rc1, order ORD-48213-2231, id 123e4567-e89b-12d3-a456-426614174000, "
            "commit 9fceb02d0ae598e95dc970b74767f19372d61af8, version 2.31.0")  # fmt: skip
    assert find_matches(text) == []


def test_addresses_and_birth_dates():
    text = "I was born on March 4, 1987 and live at 42 Maple Street Apt. 7, Springfield, IL 62704."
    found = {(m.entity, text[m.start : m.end]) for m in find_matches(text)}
    assert ("DATE_OF_BIRTH", "March 4, 1987") in found
    assert ("STREET_ADDRESS", "42 Maple Street Apt. 7") in found
    assert ("STREET_ADDRESS", "Springfield, IL 62704") in found
    assert _found("The meeting is on March 4, 1987 sharp.", "DATE_OF_BIRTH") == []


def test_entropy():
    assert shannon_entropy("aaaa") == 0
    assert shannon_entropy("abcd") == 2


def test_only_requested_entities_run():
    key = secret_makers(random.Random(1))["AWS_ACCESS_KEY_ID"]()
    text = f"key {key} and mail at 42 Maple Street"
    assert {m.entity for m in find_matches(text, {"STREET_ADDRESS"})} == {"STREET_ADDRESS"}
