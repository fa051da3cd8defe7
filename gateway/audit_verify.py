"""Checks audit logs for tampering: gaps, edits and reorderings in each process stream's chain.

Owns reading audit lines back and judging the chain the writer built (`gateway.audit.seq` and
`gateway.audit.prev_hash`, see `gateway.audit`). Must not change the files it reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.audit import GENESIS, event_hash


@dataclass(frozen=True, slots=True)
class Entry:
    """One chained event: where it was read and what it claims."""

    where: str  # file:line
    seq: int
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # gap, edited, reordered, duplicate, unreadable
    where: str
    stream: str
    detail: str


@dataclass(slots=True)
class Verdict:
    events: int = 0
    streams: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def read_lines(paths: Iterable[Path]) -> Iterator[tuple[str, str]]:
    """(file:line, text) for every line of every file, in the order given."""
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                yield f"{path}:{number}", line.rstrip("\n")


def verify(lines: Iterable[tuple[str, str]]) -> Verdict:
    """Judges every stream found in `lines` (other log lines are skipped)."""
    verdict = Verdict()
    streams: dict[str, list[Entry]] = {}
    for where, text in lines:
        record = _record(text)
        if record is None:
            if '"gateway.audit.seq"' in text:
                verdict.problems.append(Problem("unreadable", where, "?", "not valid JSON"))
            continue
        stream = str(record["gateway.audit.stream"])
        entry = Entry(where, int(record["gateway.audit.seq"]),
                      str(record["gateway.audit.prev_hash"]), event_hash(record))  # fmt: skip
        streams.setdefault(stream, []).append(entry)
    verdict.events = sum(len(entries) for entries in streams.values())
    verdict.streams = len(streams)
    for stream, entries in streams.items():
        _judge(stream, entries, verdict)
    return verdict


def _record(text: str) -> dict[str, Any] | None:
    if '"gateway.audit.seq"' not in text:
        return None
    try:
        record = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("gateway.audit.seq"), int):
        return None
    return record


def _judge(stream: str, entries: list[Entry], verdict: Verdict) -> None:
    _reorderings(stream, entries, verdict)
    ordered = sorted(entries, key=lambda e: e.seq)
    first = ordered[0]
    if first.seq != 1:
        verdict.notes.append(f"stream {stream} starts at seq {first.seq} ({first.where}): "
                             "earlier events are in another file or missing")  # fmt: skip
    elif first.prev_hash != GENESIS:
        verdict.problems.append(Problem("edited", first.where, stream, "seq 1 has no genesis hash"))
    for before, after in zip(ordered, ordered[1:], strict=False):
        _link(stream, before, after, verdict)


def _reorderings(stream: str, entries: list[Entry], verdict: Verdict) -> None:
    highest = entries[0]
    for entry in entries[1:]:
        if entry.seq < highest.seq:
            verdict.problems.append(Problem("reordered", entry.where, stream,
                                            f"seq {entry.seq} comes after seq {highest.seq} "
                                            f"({highest.where})"))  # fmt: skip
        else:
            highest = entry


def _link(stream: str, before: Entry, after: Entry, verdict: Verdict) -> None:
    if after.seq == before.seq:
        verdict.problems.append(Problem("duplicate", after.where, stream,
                                        f"seq {after.seq} also at {before.where}"))  # fmt: skip
    elif after.seq != before.seq + 1:
        missing = f"{before.seq + 1}" if after.seq == before.seq + 2 else \
            f"{before.seq + 1}..{after.seq - 1}"  # fmt: skip
        verdict.problems.append(Problem("gap", after.where, stream,
                                        f"seq {missing} missing before this line "
                                        f"(after {before.where})"))  # fmt: skip
    elif after.prev_hash != before.hash:
        verdict.problems.append(Problem("edited", before.where, stream,
                                        f"seq {before.seq} does not match the hash recorded by "
                                        f"seq {after.seq} ({after.where})"))  # fmt: skip
