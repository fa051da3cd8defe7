"""Pseudonyms, address truncation, agent families and the scrubber every audit sink shares."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime, timedelta

import pytest
from faker import Faker

from gateway import audit_privacy
from gateway.audit import GENESIS
from gateway.audit_privacy import (
    Pseudonymizer,
    scrub,
    scrub_text,
    truncate_address,
    user_agent_family,
)
from gateway.config import AuditSettings
from tests.fakes.audit_values import KEY_A, KEY_B, fake_jwt, names, secret

NOW = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)


def test_pseudonyms_are_stable_per_key_and_differ_between_keys():
    one, two = names(), Pseudonymizer([("k1", KEY_B.encode())])
    assert one.user("alice") == names().user("alice")
    assert one.user("alice") != two.user("alice")
    assert one.user("alice") != one.tenant("alice")
    assert one.user("alice").startswith("ps_") and "alice" not in one.user("alice")
    assert one.key_id == "k2"


def test_rotation_overlap_carries_the_older_pseudonyms_until_it_ends():
    overlapping = names(NOW + timedelta(days=1))
    older = Pseudonymizer([("k1", KEY_B.encode())]).user("alice")
    assert overlapping.older_users("alice", NOW) == [older]
    assert overlapping.older_users("alice", NOW + timedelta(days=2)) == []
    assert names().older_users("alice", NOW) == []


def test_without_configured_keys_a_random_ephemeral_key_is_used():
    first = Pseudonymizer.from_settings(AuditSettings())
    second = Pseudonymizer.from_settings(AuditSettings())
    assert first.key_id == "ephemeral"
    assert first.user("alice") != second.user("alice")


# --- addresses, agents, scrubber ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("2001:db8:abcd:12::1", "2001:db8:abcd::/48"),
        ("::ffff:198.51.100.9", "198.51.100.0/24"),
        ("fe80::1%eth0", "fe80::/48"),
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("", None),
        ("not-an-address", None),
    ],
)
def test_addresses_are_truncated_to_their_network(address, expected):
    assert truncate_address(address) == expected


@pytest.mark.parametrize(
    ("agent", "family"),
    [
        ("OpenAI/Python 1.50.0", "openai-python"),
        ("curl/8.1.2", "curl"),
        ("Mozilla/5.0 (X11) AppleWebKit Chrome/120.0 Safari/537.36", "chrome"),
        ("my-tool/1.0 (contact alice@example.org)", "other"),
        (None, None),
    ],
)
def test_user_agents_are_reduced_to_a_family(agent, family):
    assert user_agent_family(agent) == family


def generated_secrets() -> list[str]:
    fake = Faker()
    fake.seed_instance(11)
    return [
        fake.email(),
        secret("AKIA", 16, string.ascii_uppercase + string.digits),
        secret("ghp_", 36),
        secret("sk-", 48),
        secret("sk-proj-", 40),
        secret("xoxb-", 30, string.digits + "-"),
        fake_jwt(),
        secret("", 40, string.ascii_letters + string.digits + "/+"),
        "Bearer " + secret("", 20, string.ascii_lowercase),
        fake.ipv4_public(),
        fake.ipv6(),
        "-----BEGIN RSA "
        + "PRIVATE KEY-----\n"
        + secret("", 64)
        + "\n-----END RSA "
        + "PRIVATE KEY-----",
    ]


@pytest.mark.parametrize("value", generated_secrets())
def test_the_scrubber_removes_emails_keys_tokens_and_addresses(value):
    scrubbed = scrub_text(f"before {value} after")
    assert value not in scrubbed
    assert scrubbed.startswith("before ") and scrubbed.endswith(" after")


@pytest.mark.parametrize(
    "value",
    [
        "ps_0123456789abcdef01234567",
        "req_0123456789abcdef0123456789abcdef",
        GENESIS,
        "gpt-4o-mini",
        "chat.completions",
        "2024-05-01T09:30:00.000Z",
    ],
)
def test_the_scrubber_keeps_ids_hashes_and_names(value):
    assert scrub_text(value) == value


def test_scrub_walks_nested_values_and_trusts_only_its_own_fields():
    email = Faker().email()
    event = {"a": [email, {"b": email}], "source.address": "203.0.113.0/24", "n": 3}
    assert scrub(event) == {
        "a": ["[email]", {"b": "[email]"}],
        "source.address": "203.0.113.0/24",
        "n": 3,
    }


def test_cached_pseudonyms_equal_the_uncached_hmac():
    subjects = [Faker().email() for _ in range(50)]
    first, second = names(), Pseudonymizer([("k1", KEY_B.encode())])
    for _ in range(2):
        for subject in subjects:
            assert first.user(subject) == audit_privacy._hmac(KEY_A.encode(), "user", subject)
            assert first.tenant(subject) == audit_privacy._hmac(KEY_A.encode(), "tenant", subject)
            assert second.user(subject) == audit_privacy._hmac(KEY_B.encode(), "user", subject)
    assert first.user(subjects[0]) != second.user(subjects[0])


def test_the_scrubber_gives_the_same_answer_the_second_time(monkeypatch):
    monkeypatch.setattr(audit_privacy, "_CLEAN_TEXTS", 8)
    texts = [f"model-{index}" for index in range(20)] + generated_secrets()
    first = [scrub_text(f"before {text} after") for text in texts]
    second = [scrub_text(f"before {text} after") for text in texts]
    assert first == second
    assert first[:20] == [f"before model-{index} after" for index in range(20)]
    assert len(audit_privacy._CLEAN) <= 8
    assert not any(text in clean for text in generated_secrets() for clean in audit_privacy._CLEAN)


def request_ids() -> list[str]:
    rng = random.Random(7)
    return ["req_" + "0" * 32, "req_" + "f" * 32, "req_" + "a1" * 16] + [
        f"req_{rng.getrandbits(128):032x}" for _ in range(200)
    ]


def test_the_gateways_request_ids_pass_as_the_pattern_would_pass_them():
    for request_id in request_ids():
        assert audit_privacy._SCRUB.sub(audit_privacy._mark, request_id) == request_id
        assert scrub_text(request_id) == request_id
        assert request_id not in audit_privacy._CLEAN
