"""Sharing one text between workers finds exactly what analysing it whole finds."""

from __future__ import annotations

import random

import pytest
from faker import Faker

from gateway.config import RedactionSettings
from gateway.redaction_split import MIN_PIECE, join_pieces, plan_pieces, spread
from gateway.redaction_worker import analyze_in_worker, init_worker

pytestmark = pytest.mark.slow
SETTINGS = RedactionSettings()
ENTITIES = SETTINGS.rules.detected()
SIZES = [(1024, 1), (1800, 2), (2600, 3), (3500, 4), (4600, 5), (5800, 6), (7000, 7), (8192, 8)]


def prompt(size: int, seed: int) -> str:
    """Seeded prose dense with names, places and contact data, at most `size` characters."""
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    makers = (
        lambda: f"{fake.name()} moved to {fake.city()} in {fake.month_name()}.",
        lambda: f"Please email {fake.email()} or call {fake.phone_number()} today.",
        lambda: f"Ask {fake.first_name()} about the parcel for {fake.street_address()}.",
        lambda: f"{fake.company()} hired {fake.name()}, who lives in {fake.state()}.",
        lambda: fake.sentence(nb_words=rng.randint(6, 16)),
    )
    text = ""
    while True:
        sentence = rng.choice(makers)() + rng.choice((" ", " ", "\n"))
        if len(text) + len(sentence) > size:
            return text.rstrip()
        text += sentence


@pytest.fixture(scope="module")
def analyze():
    init_worker(SETTINGS.spacy_model, SETTINGS.phone_regions)  # spaCy loads once, in-process
    return analyze_in_worker


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize(("size", "seed"), SIZES)
def test_pieces_find_what_the_whole_text_finds(analyze, size, seed, parts):
    text = prompt(size, seed)
    (whole,) = analyze([(text, ENTITIES)])
    pieces = plan_pieces([text], ENTITIES, parts)
    assert len([p for p in pieces if "PERSON" in p.entities]) == min(parts, len(text) // MIN_PIECE)
    (joined,) = join_pieces([text], pieces, analyze([p.job([text]) for p in pieces]))
    assert any(entity == "PERSON" for _, _, entity, _ in whole)
    assert sorted(joined) == sorted(whole)


@pytest.mark.parametrize("parts", [2, 3])
def test_ner_pieces_own_every_character_once(parts):
    texts = [prompt(size, seed) for size, seed in SIZES]
    pieces = plan_pieces(texts, ENTITIES, parts)
    for index, text in enumerate(texts):
        owned = sorted(
            (p.own, p.own_end) for p in pieces if p.index == index and "PERSON" in p.entities
        )
        assert owned[0][0] == 0 and owned[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(owned, owned[1:], strict=False))


def test_one_worker_gets_whole_texts_in_one_task():
    texts = ["Ask Jane Doe in Paris.", "Mail bo@example.com"]
    pieces = plan_pieces(texts, ENTITIES, 1)
    assert [(p.start, p.end, p.entities) for p in pieces] == [
        (0, len(texts[0]), ENTITIES), (0, len(texts[1]), ENTITIES)]  # fmt: skip
    assert spread(pieces, 1) == [pieces]
