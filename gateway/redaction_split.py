"""Sharing one request's analysis between idle redaction workers.

Owns the plan that cuts texts into pieces (patterns on whole texts, NER on overlapping pieces),
the spreading of pieces over worker tasks and the joining of their findings back into each
text's coordinates. Pure functions on strings and offsets: must not import Presidio or spaCy,
run analyses or know about processes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.redaction_rules import NER_ENTITIES

RawFinding = tuple[int, int, str, float]
"""A finding as a worker reports it: start, end, entity type, score."""
Job = tuple[str, tuple[str, ...]]
"""One analysis in a worker: a text (or a piece of one) and the entity types to look for."""
MIN_PIECE = 320
"""Characters of NER a piece must have for splitting to save more than it costs."""
OVERLAP = 64
"""Characters each NER piece also reads past its cuts, so NER sees a name at a cut whole."""
PATTERN_COST = 0.1
"""Cost of the pattern recognizers per character, relative to NER."""
_SENTENCE_END = re.compile(r"[.!?:;\n]\s+")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Piece:
    """`text[start:end]` of text `index`, keeping findings that begin in `[own, own_end)`."""

    index: int
    start: int
    end: int
    own: int
    own_end: int
    entities: tuple[str, ...]

    def job(self, texts: Sequence[str]) -> Job:
        return texts[self.index][self.start : self.end], self.entities

    @property
    def cost(self) -> float:
        ner = any(e in NER_ENTITIES for e in self.entities)
        return (self.end - self.start) * (1.0 if ner else PATTERN_COST)


def plan_pieces(texts: Sequence[str], entities: tuple[str, ...], parts: int) -> list[Piece]:
    """Whole texts for one worker; for more, patterns on whole texts and NER on pieces.

    Patterns always see the whole text (a PEM block may be longer than any overlap); NER
    pieces are cut at sentence ends or spaces and overlap, and each keeps only the findings
    that begin between its cuts, so every finding is reported once.
    """
    ner = tuple(e for e in entities if e in NER_ENTITIES)
    if parts < 2 or not ner:
        return [Piece(i, 0, len(t), 0, len(t), entities) for i, t in enumerate(texts)]
    others = tuple(e for e in entities if e not in NER_ENTITIES)
    pieces = [Piece(i, 0, len(t), 0, len(t), others) for i, t in enumerate(texts) if others]
    for i, text in enumerate(texts):
        cuts = cut_points(text, min(parts, len(text) // MIN_PIECE))
        for own, own_end in itertools.pairwise(cuts):
            start = _space_before(text, own - OVERLAP) if own else 0
            end = _space_after(text, own_end + OVERLAP) if own_end < len(text) else own_end
            pieces.append(Piece(i, start, end, own, own_end, ner))
    return pieces


def cut_points(text: str, parts: int) -> list[int]:
    """0, the starts of `parts` - 1 roughly equal pieces (at sentence ends or spaces), len."""
    cuts = [0]
    for k in range(1, max(parts, 1)):
        at = _boundary(text, len(text) * k // parts)
        if cuts[-1] < at < len(text):
            cuts.append(at)
    return [*cuts, len(text)]


def _boundary(text: str, at: int) -> int:
    for pattern in (_SENTENCE_END, _SPACE):
        ends = [m.end() for m in pattern.finditer(text, max(0, at - 120), at + 120)]
        if ends:
            return min(ends, key=lambda end: abs(end - at))
    return at


def _space_before(text: str, at: int) -> int:
    space = max(text.rfind(" ", 0, max(at, 0)), text.rfind("\n", 0, max(at, 0)))
    return space + 1 if space >= 0 else 0


def _space_after(text: str, at: int) -> int:
    found = _SPACE.search(text, min(at, len(text)))
    return found.start() if found else len(text)


def spread(pieces: list[Piece], parts: int) -> list[list[Piece]]:
    """At most `parts` tasks of about equal cost (largest pieces first, to the lightest task)."""
    tasks: list[list[Piece]] = [[] for _ in range(max(parts, 1))]
    load = [0.0] * len(tasks)
    for piece in sorted(pieces, key=lambda p: -p.cost):
        lightest = load.index(min(load))
        tasks[lightest].append(piece)
        load[lightest] += piece.cost
    return [task for task in tasks if task]


def join_pieces(
    texts: Sequence[str], pieces: Sequence[Piece], found: Sequence[tuple[RawFinding, ...]]
) -> list[tuple[RawFinding, ...]]:
    """Raw findings per text, in its coordinates, from the findings per piece."""
    joined: list[list[RawFinding]] = [[] for _ in texts]
    for piece, findings in zip(pieces, found, strict=True):
        for start, end, entity, score in findings:
            if piece.own <= start + piece.start < piece.own_end:
                joined[piece.index].append((start + piece.start, end + piece.start, entity, score))
    return [tuple(findings) for findings in joined]
