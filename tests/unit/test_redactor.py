"""The Presidio engine: offline, focused, cached, bounded and failing closed."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from gateway.config import RedactionSettings
from gateway.config_load import ConfigError
from gateway.errors import PayloadTooLargeError, ServiceUnavailableError
from gateway.redaction_rules import NER_ENTITIES, EntityRule, RedactionRules, default_entities
from gateway.redaction_worker import build_analyzer
from gateway.redactor import Finding, Redactor, apply_rules, merge_overlaps
from tests.fakes.pii_samples import prompt_of_size, samples

pytestmark = pytest.mark.slow
MODEL = RedactionSettings().spacy_model


@pytest.fixture(scope="module")
def redactor():
    engine = Redactor(RedactionSettings(enabled=True, workers=1, hash_key="k",
                                        in_process_chars=1000))  # fmt: skip
    asyncio.run(engine.open())
    yield engine
    asyncio.run(engine.close())


def test_importing_the_stage_does_not_load_presidio_or_spacy():
    code = (
        "import sys, gateway.app, gateway.stages.redact_prompt, gateway.redactor, "
        "gateway.redaction_worker, gateway.redaction_split; "
        "print(any(m.split('.')[0] in ('presidio_analyzer', 'spacy') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_missing_model_is_a_startup_error_naming_the_install_command():
    engine = Redactor(RedactionSettings(spacy_model="en_core_web_missing_xx"))
    with pytest.raises(ConfigError) as caught:
        await engine.open()
    assert "pip install" in caught.value.problems[0]
    assert "requirements-model.txt" in caught.value.problems[0]


def test_building_and_using_the_analyzer_does_not_touch_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    analyzer = build_analyzer(MODEL)
    assert analyzer.nlp_engine.nlp["en"].pipe_names == ["ner"]
    results = analyzer.analyze("Write to jane.doe@example.co.uk today", language="en",
                               entities=["EMAIL_ADDRESS"])  # fmt: skip
    assert [r.entity_type for r in results] == ["EMAIL_ADDRESS"]


async def test_finds_personal_data_and_secrets(redactor):
    text = "Please ask Maria Garcia at maria.garcia@example.com, card 4111 1111 1111 1111."
    (found,) = await redactor.analyze([text], redactor.rules)
    spans = {(f.entity, text[f.start : f.end]) for f in found}
    assert ("PERSON", "Maria Garcia") in spans
    assert ("EMAIL_ADDRESS", "maria.garcia@example.com") in spans
    assert ("CREDIT_CARD", "4111 1111 1111 1111") in spans


async def test_repeated_texts_are_served_from_the_cache(redactor, monkeypatch):
    history = [f"Turn {i}: please call Robert Miller about ticket {i}." for i in range(20)]
    await redactor.analyze(history, redactor.rules)
    sent: list[list[str]] = []
    original = redactor._run

    async def spy(texts, entities):
        sent.append(list(texts))
        return await original(texts, entities)

    monkeypatch.setattr(redactor, "_run", spy)
    again = [*history, "Turn 20: and email robert@example.com"]
    results = await redactor.analyze(again, redactor.rules)
    assert sent == [[again[-1]]]
    assert len(results) == 21 and all(results)


async def test_rules_change_what_is_reported(redactor):
    text = "Mail maria.garcia@example.com or support@acme.test now."
    rules = RedactionRules(entities={"EMAIL_ADDRESS": EntityRule()}, allow=("support@acme.test",))
    (found,) = await redactor.analyze([text], rules)
    assert [text[f.start : f.end] for f in found] == ["maria.garcia@example.com"]
    default = redactor.rules
    redactor.update_rules(rules)
    assert redactor.rules is rules
    redactor.update_rules(default)


async def test_overload_is_refused_quickly(redactor):
    settings = redactor.settings
    redactor.settings = settings.model_copy(update={"queue_size": 0})
    busy = redactor._pending
    redactor._pending = redactor.workers  # every worker busy, no queue left
    try:
        results = await asyncio.gather(
            redactor.analyze(["A second new text about Bo Chen."], redactor.rules),
            return_exceptions=True,
        )
    finally:
        redactor.settings = settings
        redactor._pending = busy
    assert isinstance(results[0], ServiceUnavailableError)
    assert results[0].headers["Retry-After"] == "1"
    (found,) = await redactor.analyze(["A second new text about Bo Chen."], redactor.rules)
    assert [f.entity for f in found] == ["PERSON"]  # accepted again once a worker is free


async def test_slow_analysis_fails_closed(redactor):
    settings = redactor.settings
    redactor.settings = settings.model_copy(update={"timeout": 0.001})
    try:
        with pytest.raises(ServiceUnavailableError):
            await redactor.analyze(["Jane Roe " * 2000], redactor.rules)
    finally:
        redactor.settings = settings
    await asyncio.sleep(0.5)  # let the worker finish the abandoned analysis


async def test_text_over_the_limit_is_refused(redactor):
    with pytest.raises(PayloadTooLargeError):
        await redactor.analyze(["x" * (redactor.settings.max_text_chars + 1)], redactor.rules)


async def test_hash_is_keyed_and_stable(redactor):
    assert redactor.keyed_hash("a") == redactor.keyed_hash("a") != redactor.keyed_hash("b")
    other = Redactor(RedactionSettings(hash_key="other"))
    assert other.keyed_hash("a") != redactor.keyed_hash("a")


async def test_crashed_worker_fails_closed_then_recovers(redactor):
    assert await redactor.ready() is None
    assert redactor._pool is not None
    redactor._pool.submit(os._exit, 1)
    await asyncio.sleep(0.5)
    with pytest.raises(ServiceUnavailableError):
        await redactor.analyze(["A fresh text for Carl Jung."], redactor.rules)
    (found,) = await redactor.analyze(["Another text for Carl Jung."], redactor.rules)
    assert [f.entity for f in found] == ["PERSON"]


def test_thresholds_allow_patterns_and_deny_list():
    rules = RedactionRules(
        entities={"PERSON": EntityRule(threshold=0.8), "DENY_LIST": EntityRule()},
        allow_patterns=(r".*@acme\.test",), deny=("Project Falcon",),
    )  # fmt: skip
    text = "Ann Lee and Bo at x@acme.test on project falcon"
    raw = [(0, 7, "PERSON", 0.85), (12, 14, "PERSON", 0.5), (18, 29, "EMAIL_ADDRESS", 1.0)]
    found = apply_rules(text, raw, rules)
    assert [(text[f.start : f.end], f.entity) for f in found] == [
        ("Ann Lee", "PERSON"), ("project falcon", "DENY_LIST")]  # fmt: skip


def test_overlaps_become_their_union():
    merged = merge_overlaps([Finding(0, 10, "LOCATION", 0.85), Finding(5, 25, "STREET_ADDRESS",
                             0.75), Finding(30, 35, "PERSON", 0.9)])  # fmt: skip
    assert merged == [Finding(0, 25, "STREET_ADDRESS", 0.85), Finding(30, 35, "PERSON", 0.9)]


def _pattern_only_rules() -> RedactionRules:
    return RedactionRules(entities={name: rule for name, rule in default_entities().items()
                                    if name not in NER_ENTITIES})  # fmt: skip


@pytest.fixture(scope="module")
def pattern_redactors():
    """Two redactors for rules without NER: one analyzes short texts in process, one never."""
    rules = _pattern_only_rules()
    local = Redactor(RedactionSettings(enabled=True, workers=1, rules=rules,
                                       in_process_chars=1000))  # fmt: skip
    remote = Redactor(RedactionSettings(enabled=True, workers=1, rules=rules, in_process_chars=0))

    async def open_both():
        await asyncio.gather(local.open(), remote.open())

    asyncio.run(open_both())
    yield local, remote
    asyncio.run(local.close())
    asyncio.run(remote.close())


def _generated_texts() -> list[str]:
    texts = [sample.text for sample in samples(seed=7, per_kind=6)]
    texts += [prompt_of_size(size, seed)[0] for size in (300, 600, 1000) for seed in (1, 2, 3)]
    return texts


async def test_in_process_analysis_finds_exactly_what_the_workers_find(pattern_redactors):
    local, remote = pattern_redactors
    entities = local.rules.detected()
    texts = _generated_texts()
    assert local._local is not None and remote._local is None
    assert all(local._fits_in_process([text], entities) for text in texts)
    here = [local._analyze_here([text], entities)[0] for text in texts]
    there = [(await remote._run([text], entities))[0] for text in texts]
    assert here == there
    assert sum(1 for found in here if found) > len(texts) // 2  # not a vacuous comparison


async def test_only_short_pattern_only_work_stays_in_process(pattern_redactors, monkeypatch):
    local, _ = pattern_redactors
    submitted: list[list[str]] = []
    original = local._submit

    def spy(pool, jobs):
        submitted.append([text for text, _ in jobs])
        return original(pool, jobs)

    monkeypatch.setattr(local, "_submit", spy)
    limit = local.settings.in_process_chars
    short = "Write to nadia.kowalski@example.org about it."
    await local.analyze([short], local.rules)
    assert submitted == []
    long = short + " filler" * (limit // 7)
    (found,) = await local.analyze([long], local.rules)
    assert submitted == [[long]] and [f.entity for f in found] == ["EMAIL_ADDRESS"]
    two = [f"Note {i}: mail nadia.k{i}@example.org. " + "x" * (limit // 2) for i in range(2)]
    await local.analyze(two, local.rules)  # short each, too long together
    assert submitted[-1] == two
    ner = RedactionRules(entities={"PERSON": EntityRule(), "EMAIL_ADDRESS": EntityRule()})
    await local.analyze(["Tell Nadia Kowalski the news."], ner)
    assert submitted[-1] == ["Tell Nadia Kowalski the news."]


def test_rules_with_ner_load_no_analyzer_in_process(redactor):
    assert redactor.settings.in_process_chars > 0
    assert redactor._local is None


async def test_a_cache_of_size_zero_still_redacts(pattern_redactors):
    for engine in pattern_redactors:
        settings = engine.settings
        engine.settings = settings.model_copy(update={"cache_size": 0})
        try:
            (found,) = await engine.analyze(["Mail ola.berg@example.net now."], engine.rules)
        finally:
            engine.settings = settings
        assert [f.entity for f in found] == ["EMAIL_ADDRESS"]


async def test_cached_text_follows_the_rules_of_each_call(pattern_redactors):
    local, _ = pattern_redactors
    text = "Mail maria.garcia@example.com or support@example.org now."
    emails = {"EMAIL_ADDRESS": EntityRule()}
    strict = RedactionRules(entities=emails)
    lenient = RedactionRules(entities=emails, allow=("SUPPORT@example.org",))
    for rules, expected in ((strict, 2), (lenient, 1), (strict, 2), (lenient, 1)):
        (found,) = await local.analyze([text], rules)
        assert len(found) == expected


def test_cache_keys_name_the_entity_types_looked_for():
    engine = Redactor(RedactionSettings(enabled=True, workers=1))
    text = ["Mail ola.berg@example.net now."]
    emails = engine._keys(("EMAIL_ADDRESS",), text)
    both = engine._keys(("EMAIL_ADDRESS", "PHONE_NUMBER"), text)
    assert emails != both
    other_rules = tuple(["EMAIL_ADDRESS"])  # an equal tuple, another object
    assert engine._keys(other_rules, text) == emails
    assert engine._keys(("EMAIL_ADDRESS", "PHONE_NUMBER"), ["Mail them."]) != both
