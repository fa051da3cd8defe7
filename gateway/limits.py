"""The limit algorithms and their in-memory backend.

Owns the values of a reservation (`Limit`, `Ask`, `Decision`, `Reservation`), the keys of each
dimension's limits, the reading of a reservation's reply and `MemoryBackend`, which mirrors the
Lua script Redis runs (`gateway.limit_script`) line for line so the embedded default behaves
exactly as Redis does. Must not do I/O (the Redis client lives in `limiter.py`) nor know HTTP
or OpenAI payloads.

Algorithms (times in milliseconds, `now` from the calling process's clock):
- Rates (requests per second / minute, tokens per minute) use GCRA, a token bucket kept as
  one number, the theoretical arrival time TAT. A limit of N per window W has an emission
  interval T = W / N and a burst of N: a request costing c passes when
  max(TAT, now) + c*T - W <= now, and then TAT becomes max(TAT, now) + c*T. So N requests
  pass at once, then one more every T; the wait of a refused one is exact (Retry-After).
- Budgets (daily / monthly tokens) are counters per UTC calendar period, whose key names the
  period; they expire a day after it ends.
- Concurrency is a sorted set of request ids scored by lease expiry: a slot is released on
  settle, or when a crashed process's lease runs out.
A reservation checks every limit of a request first and writes only if all pass, so a
refused request costs nothing. Token limits reserve `tokens` (prompt + maximum completion);
budgets may grant less (down to `least`) so a call can run up to the budget and be cut there.
Settling adds the difference between the tokens used and the tokens granted, so what every
token counter holds adds up to the usage reported.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from gateway.config import LimitValues

DAY_MS = 86_400_000
EPSILON = 1e-6  # float slack so exact boundaries compare the same in Lua and Python
CONCURRENCY_RETRY_MS = 1000
NEVER = math.inf  # the wait of a request larger than the limit itself
RATES = {"requests_per_second": ("r", 1000), "requests_per_minute": ("r", 60_000),
         "tokens_per_minute": ("t", 60_000)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of one dimension. kind: r (request rate), t (token rate), b (token budget),
    c (concurrency). window_ms: the rate window, the ms left in a budget's period, or the
    concurrency lease."""

    name: str
    dimension: str
    key: str
    kind: str
    limit: int
    window_ms: int


# Ask, Reservation and Decision are never changed once made, yet not frozen: each request
# makes one of each, and a frozen dataclass sets every field through `object.__setattr__`,
# which made building them cost more than reading the script's reply.


@dataclass(slots=True)
class Ask:
    """What one request wants: every limit that applies, and its tokens (most, least).
    The request id names its concurrency slots; it has no spaces nor `;` (the script's
    separators). Not frozen (see above)."""

    request_id: str
    limits: tuple[Limit, ...]
    tokens: int = 0
    least: int = 0


@dataclass(frozen=True, slots=True)
class Standing:
    """A limit's state after the decision: what is left and ms until it is full again."""

    limit: Limit
    remaining: int
    reset_ms: int


@dataclass(slots=True)
class Reservation:
    """What an allowed request holds until it settles. Not frozen (see above)."""

    request_id: str
    limits: tuple[Limit, ...]
    granted: int
    backend: str


@dataclass(slots=True)
class Decision:
    """allowed, or refused by `blocked` (retry_ms -1: the request can never pass). `reply` is
    the script's reply, whose tail (from index 4) holds the remaining and reset ms of each
    limit in turn: `standings` reads them. Not frozen (see above)."""

    allowed: bool
    granted: int
    retry_ms: int
    blocked: Limit | None
    reservation: Reservation | None
    limits: tuple[Limit, ...]
    reply: Sequence[int]

    @property
    def standings(self) -> tuple[Standing, ...]:
        """Each limit's state after the decision (read from the reply when asked: most
        requests only need the headers, which `gateway.stages.rate_limit` reads directly)."""
        pairs = iter(self.reply[4:])  # remaining, reset of each limit: zip takes them in pairs
        triples = zip(self.limits, pairs, pairs, strict=False)  # a short reply: those it covers
        return tuple([Standing(lim, left, reset) for lim, left, reset in triples])


class Backend(Protocol):
    name: str

    async def reserve(self, ask: Ask, now_ms: float | None) -> Decision: ...

    async def settle(self, reservation: Reservation, used: int, now_ms: float | None) -> None: ...


def limits_for(values: LimitValues, dimension: str, ident: str, *, now: float,
               lease_ms: int) -> list[Limit]:  # fmt: skip
    """The limits of one dimension (`ident` is hashed, so keys never show users)."""
    base = f"{dimension}:{_digest(ident)}"
    found: list[Limit] = []
    for name, (kind, window) in RATES.items():
        value = getattr(values, name)
        if value is not None:
            found.append(Limit(name, dimension, f"{base}:{name}", kind, value, window))
    if values.concurrent is not None:
        found.append(Limit("concurrent", dimension, f"{base}:cc", "c", values.concurrent, lease_ms))
    if values.daily_tokens is None and values.monthly_tokens is None:
        return found
    now_ms = now * 1000
    for name, (period, end_ms) in _periods(int(now // 86400)).items():
        value = getattr(values, name)
        if value is not None:
            left = max(1, math.ceil(end_ms - now_ms))
            found.append(Limit(name, dimension, f"{base}:{period}", "b", value, left))
    return found


@functools.lru_cache(maxsize=4)
def _periods(day: int) -> dict[str, tuple[str, int]]:
    """The budget periods of a UTC day number: key suffix and end (epoch ms) of each."""
    start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=day)
    day_end = start + timedelta(days=1)
    month_end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    return {
        "daily_tokens": (start.strftime("d%Y%m%d"), int(day_end.timestamp() * 1000)),
        "monthly_tokens": (start.strftime("m%Y%m"), int(month_end.timestamp() * 1000)),
    }


@functools.lru_cache(maxsize=65536)
def _digest(ident: str) -> str:
    return hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()


class MemoryBackend:
    """The same algorithms as the Lua script, in this process only (atomic: no awaits)."""

    name = "memory"

    def __init__(self) -> None:
        self._values: dict[str, tuple[float, float]] = {}  # key -> (value, expires_ms)
        self._leases: dict[str, dict[str, float]] = {}  # key -> request id -> expires_ms
        self._writes = 0

    async def reserve(self, ask: Ask, now_ms: float | None) -> Decision:
        return self.reserve_now(ask, _now_ms() if now_ms is None else now_ms)

    async def settle(self, reservation: Reservation, used: int, now_ms: float | None) -> None:
        self.settle_now(reservation, used, _now_ms() if now_ms is None else now_ms)

    def reserve_now(self, ask: Ask, now_ms: float) -> Decision:
        """The script's `reserve`, line for line."""
        limits = ask.limits
        value = [self._count(lim.key, now_ms) if lim.kind == "c" else self._get(lim.key, now_ms)
                 for lim in limits]  # fmt: skip
        blocked, retry, grant = 0, 0.0, ask.tokens
        for i, lim in enumerate(limits, 1):
            if lim.kind == "b" and blocked == 0:
                room = lim.limit - value[i - 1]
                if room < ask.least:
                    blocked, retry = i, -1
                if room < grant:
                    grant = int(max(room, 0))
        out: list[int] = []
        pre: list[int] = []
        new: list[float] = []
        for i, lim in enumerate(limits, 1):
            wait, taken, before, after = _judge(lim, value[i - 1], grant, now_ms)
            new.append(after)
            if retry != -1 and wait == NEVER:
                blocked, retry = i, -1
            elif retry != -1 and wait > EPSILON and wait > retry:
                blocked, retry = i, wait
            out += taken
            pre += before
        if blocked:
            retry_ms = math.ceil(retry) if retry > 0 else int(retry)
            return decision_from(ask, [0, blocked, retry_ms, grant, *pre], self.name)
        for lim, after in zip(limits, new, strict=True):
            self._commit(lim, after, grant, ask.request_id, now_ms)
        return decision_from(ask, [1, 0, 0, grant, *out], self.name)

    def settle_now(self, reservation: Reservation, used: int, now_ms: float) -> None:
        """The script's `settle`, line for line."""
        delta = used - reservation.granted
        for lim in reservation.limits:
            if lim.kind == "c":
                self._leases.get(lim.key, {}).pop(reservation.request_id, None)
            elif lim.kind == "t" and delta:
                tat = max(self._get(lim.key, now_ms), now_ms) + delta * (lim.window_ms / lim.limit)
                self._put(lim.key, tat, now_ms, math.ceil(tat - now_ms) + 1000)
            elif lim.kind == "b" and delta and (delta > 0 or self._has(lim.key, now_ms)):
                old, expires = self._values.get(lim.key, (0.0, now_ms + lim.window_ms + DAY_MS))
                self._values[lim.key] = (old + delta, expires)

    def _commit(self, lim: Limit, after: float, grant: int, rid: str, now_ms: float) -> None:
        if lim.kind in ("r", "t"):
            self._put(lim.key, after, now_ms, math.ceil(after - now_ms) + 1000)
        elif lim.kind == "b" and grant > 0:
            old = self._get(lim.key, now_ms)
            self._values[lim.key] = (old + grant, now_ms + lim.window_ms + DAY_MS)
        elif lim.kind == "c":
            self._leases.setdefault(lim.key, {})[rid] = now_ms + lim.window_ms
        self._sweep(now_ms)

    def _get(self, key: str, now_ms: float) -> float:
        found = self._values.get(key)
        if found is None or found[1] <= now_ms:
            return 0.0
        return found[0]

    def _has(self, key: str, now_ms: float) -> bool:
        found = self._values.get(key)
        return found is not None and found[1] > now_ms

    def _put(self, key: str, value: float, now_ms: float, ttl_ms: int) -> None:
        if value > now_ms:
            self._values[key] = (round(value, 3), now_ms + ttl_ms)
        else:
            self._values.pop(key, None)

    def _count(self, key: str, now_ms: float) -> int:
        leases = self._leases.get(key, {})
        for rid in [r for r, expires in leases.items() if expires <= now_ms]:
            del leases[rid]
        return len(leases)

    def _sweep(self, now_ms: float) -> None:
        """Drops expired keys now and then, so idle subjects do not pile up."""
        self._writes += 1
        if self._writes % 4096:
            return
        self._values = {k: v for k, v in self._values.items() if v[1] > now_ms}
        self._leases = {k: v for k, v in self._leases.items() if v}


def _now_ms() -> float:
    return round(time.time() * 1000, 3)


def _judge(
    lim: Limit, value: float, grant: int, now_ms: float
) -> tuple[float, tuple[int, int], tuple[int, int], float]:
    """(wait ms or NEVER, (remaining, reset ms) if taken, the same if not, new value)."""
    if lim.kind in ("r", "t"):
        cost = grant if lim.kind == "t" else 1
        interval = lim.window_ms / lim.limit
        tat = max(value, now_ms)
        after = tat + cost * interval
        wait = NEVER if cost > lim.limit else after - lim.window_ms - now_ms
        held = math.floor((now_ms + lim.window_ms - tat) / interval + EPSILON)
        left = math.floor((now_ms + lim.window_ms - after) / interval + EPSILON)
        return wait, (left, math.ceil(after - now_ms)), (held, math.ceil(tat - now_ms)), after
    room = int(max(lim.limit - value, 0))
    if lim.kind == "b":
        taken = int(max(lim.limit - value - grant, 0))
        return 0.0, (taken, lim.window_ms), (room, lim.window_ms), 0.0
    wait = float(CONCURRENCY_RETRY_MS) if value >= lim.limit else 0.0
    return wait, (int(max(lim.limit - value - 1, 0)), 0), (room, 0), 0.0


def decision_from(ask: Ask, reply: Sequence[Any], backend: str) -> Decision:
    """Reads the script's reply: {allowed, blocked, retry_ms, granted, remaining, reset, ...},
    all integers (Redis turns the script's numbers into integer replies, and `MemoryBackend`
    rounds as the script does)."""
    limits = ask.limits
    if not reply[0]:
        return Decision(False, reply[3], reply[2], limits[reply[1] - 1], None, limits, reply)
    reservation = Reservation(ask.request_id, limits, reply[3], backend)
    return Decision(True, reply[3], 0, None, reservation, limits, reply)
