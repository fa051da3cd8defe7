"""The anomaly detectors' state: what a request changes in it, the `Store` contract, and the
in-memory store (each process learns alone).

Owns the values a batch of requests reads and writes (the observation of a finished request,
visits of identities, rule-window events, folded baselines, cooldown claims) and `MemoryStore`,
whose results `RedisStore` (`gateway.anomaly_redis`) must match exactly. Must not score
anything: `gateway.anomaly` does.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

METRICS = ("requests", "tokens", "errors", "violations", "redactions", "models")
STATE_TTL = 14 * 86400  # seconds an identity's state outlives its last request


@dataclass(slots=True)
class Baseline:
    mean: float = 0.0
    spread: float = 0.0  # EWMA of absolute deviations
    count: int = 0


@dataclass(slots=True)
class Rolled:
    """The identity's minute after adding one request, and the minute it closed if any."""

    current: dict[str, float]
    closed: dict[str, float] | None
    baselines: dict[str, Baseline]
    history: int


Seen = tuple[str, str, float]
"""(set key, member, ttl seconds): a member to add to a set of things seen."""


@dataclass(slots=True)
class Observation:
    """What detection needs from one finished request: pseudonyms and counts, no content.

    Never changed once made, yet not frozen: one is made per request, and a frozen
    dataclass sets each of its 13 fields through `object.__setattr__`, which made it cost
    about as much to build as the rest of the request's detection."""

    at: float
    principal: str | None = None
    tenant: str | None = None
    address: str | None = None  # truncated network
    credential: str | None = None  # key id or fingerprint of the presented credential
    model: str | None = None
    endpoint: str | None = None
    status: int = 200
    tokens: int = 0
    violations: int = 0
    injection_blocks: int = 0
    canary_leak: bool = False
    redactions: int = 0

    def identities(self) -> list[tuple[str, str]]:
        found = []
        if self.principal:
            found.append(("principal", self.principal))
        if self.tenant:
            found.append(("tenant", self.tenant))
        return found


@dataclass(slots=True)
class Visit:
    """What requests add to one identity's state (`key` is `kind:ident`): counts to the
    current minute, members to sets of things seen, and `requests` to the hour of day. A visit
    stands for `requests` requests of one minute: `counts` are their sums and `seen` holds each
    member once, in the order first seen. When `new_model` names one of the `seen` keys, the
    minute's `models` count grows by the number of that key's members that were new.

    Never changed once made, yet not frozen (nor `Step`): a batch makes one of each per
    identity, and a frozen dataclass sets each field through `object.__setattr__`, which cost
    a batch about 20k instructions of the ~500k it costs besides its requests."""

    key: str
    counts: Mapping[str, float]
    seen: tuple[Seen, ...] = ()
    new_model: str | None = None
    requests: int = 1


@dataclass(slots=True)
class Visited:
    """The identity's state after a `Visit`: its minute rolled, whether each seen member was
    new, and the 24 hourly counts before the visit with the time the identity was first
    seen."""

    rolled: Rolled
    new: list[bool]
    hours: tuple[list[float], float]


Window = tuple[str, float]
"""(key, seconds): an event to add to a sliding window whose events are then counted."""


@dataclass(slots=True)
class Step:
    """What one request changes in the state: a `Visit` per identity, at the request's minute,
    hour of day and time, and one event per rule window."""

    visits: tuple[Visit, ...]
    minute: int
    hour: int
    now: float
    windows: tuple[Window, ...] = ()


@dataclass(slots=True)
class Reading:
    """What a `Step` found right after its changes: a `Visited` per visit and, per window, the
    events in it (this one included)."""

    visited: list[Visited]
    recent: list[int]


@dataclass(frozen=True, slots=True)
class Save:
    """An identity's baselines and history (closed minutes) after folding a closed minute."""

    key: str
    baselines: Mapping[str, Baseline]
    history: int


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim on an anomaly's cooldown: won unless the last claim won ends after `now`."""

    key: str
    now: float
    cooldown: float


class Store(Protocol):
    """Detector state; every method may raise `ServiceUnavailableError`. A batch of requests
    is read in one call and its changes written in one more, so that Redis answers a batch in
    at most two round trips."""

    async def read(self, steps: Sequence[Step]) -> list[Reading]:
        """Applies the steps in order; each reading is what its step alone would have found,
        but for the baselines, which are those stored before the batch (`write` stores new
        ones: the detector carries a batch's own folds forward)."""
        ...

    async def write(self, saves: Sequence[Save], claims: Sequence[Claim]) -> list[bool]:
        """Stores the baselines, then makes the claims in order: whether each one was won."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Minute:
    minute: int = -1
    counts: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    history: int = 0


@dataclass(slots=True)
class _Members:
    """A set of things seen and when it expires (`time.monotonic`)."""

    members: set[str] = field(default_factory=set)
    until: float = 0.0


_MAX_SEEN_SETS = 100_000


class MemoryStore:
    """Per-process state (each replica learns alone)."""

    def __init__(self) -> None:
        self._minutes: dict[str, _Minute] = {}
        self._seen: dict[str, _Members] = {}
        self._events: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}
        self._hours: dict[str, tuple[list[float], float]] = {}

    async def read(self, steps: Sequence[Step]) -> list[Reading]:
        return [self._read(step) for step in steps]

    async def write(self, saves: Sequence[Save], claims: Sequence[Claim]) -> list[bool]:
        for save in saves:
            state = self._minutes.setdefault(save.key, _Minute())
            state.baselines, state.history = dict(save.baselines), save.history
        return [self._claim(claim) for claim in claims]

    def _read(self, step: Step) -> Reading:
        visited = [self._visit(visit, step.minute, step.hour, step.now) for visit in step.visits]
        recent = [self._count_recent(key, step.now, window) for key, window in step.windows]
        return Reading(visited, recent)

    def _visit(self, visit: Visit, minute: int, hour: int, now: float) -> Visited:
        clock = time.monotonic()
        new = [self._add_seen(key, member, clock + ttl) for key, member, ttl in visit.seen]
        counts = dict(visit.counts)
        if visit.new_model is not None:
            found = [n for (key, _, _), n in zip(visit.seen, new, strict=True)
                     if key == visit.new_model]  # fmt: skip
            counts["models"] = float(sum(found))
        rolled = self._roll(visit.key, minute, counts)
        return Visited(rolled, new, self._add_hour(visit.key, hour, now, visit.requests))

    def _roll(self, key: str, minute: int, counts: Mapping[str, float]) -> Rolled:
        state = self._minutes.setdefault(key, _Minute())
        closed = None
        if state.minute < minute:
            closed = dict(state.counts) if state.minute >= 0 else None
            state.minute, state.counts = minute, {}
        for name, value in counts.items():
            state.counts[name] = state.counts.get(name, 0.0) + value
        # A copy of the mapping only: a `Baseline` is replaced (see `fold`), never changed.
        return Rolled(dict(state.counts), closed, dict(state.baselines), state.history)

    def _add_seen(self, key: str, member: str, until: float) -> bool:
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = _Members(until=until)
            if len(self._seen) > _MAX_SEEN_SETS:
                now = time.monotonic()
                self._seen = {k: v for k, v in self._seen.items() if v.until > now}
        new = member not in seen.members
        seen.members.add(member)
        seen.until = until
        return new

    def _count_recent(self, key: str, now: float, window: float) -> int:
        events = self._events.setdefault(key, deque())
        events.append(now)
        while events and events[0] <= now - window:
            events.popleft()
        return len(events)

    def _claim(self, claim: Claim) -> bool:
        if self._until.get(claim.key, float("-inf")) > claim.now:
            return False
        self._until[claim.key] = claim.now + claim.cooldown
        return True

    def _add_hour(
        self, key: str, hour: int, now: float, requests: int
    ) -> tuple[list[float], float]:
        known = self._hours.get(key)
        if known is None:
            known = self._hours[key] = ([0.0] * 24, now)
        hours, first = known
        before = list(hours)
        hours[hour] += requests
        return before, first

    async def close(self) -> None:
        """Nothing to release."""
