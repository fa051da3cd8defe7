"""The Lua script Redis runs for the limits, and the encoding of its operations.

Owns the batch script (the reservations and settlements one process gathered for one round
trip, run as one EVALSHA, in order, on one reading of the clock), the text of each
operation (a caller's limits in it kept as an `Encoding`), and `Batch`: the operations
gathered for one script call and the futures their callers await. The algorithms are those
of `gateway.limits`, whose `MemoryBackend` mirrors this script line for line. Must not do
I/O: `gateway.limiter` sends the batches.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import ServiceUnavailableError
from gateway.limits import Ask, Limit, Reservation

BATCH_SIZE = 128  # operations per script call; a fuller batch is sent at once

# The one script Redis runs: a batch of reservations and settlements of one process, applied
# in order, atomically, with one reading of the clock: each gets the answer it would alone.
# KEYS: every key the batch uses, once. ARGV[1]: the operations, separated by `;`, each of
# words separated by spaces: `r now_ms request_id tokens least n` (reserve) or
# `s now_ms request_id delta n` (settle: delta is used - granted), then
# `key_index kind limit window_ms` for each of the n limits. now_ms `-` means the Redis
# server's clock. Returns one reply per operation: a reservation's {allowed, blocked index,
# retry_ms, granted, remaining_1, reset_1, ...}, a settlement's 1. (One argument rather than
# one per operation: the client encodes each argument separately, at a cost.)
BATCH_LUA = """
local eps = 1e-6
local clock
local function now_of(stamp)
  local now = tonumber(stamp)
  if now then return now end
  if not clock then  -- no injected clock: the server's, one clock for every replica
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock
end
local function limits_of(w, at)
  local key, kind, limit, window = {}, {}, {}, {}
  for i = 1, tonumber(w[at]) do
    local j = at + (i - 1) * 4
    key[i], kind[i] = KEYS[tonumber(w[j + 1])], w[j + 2]
    limit[i], window[i] = tonumber(w[j + 3]), tonumber(w[j + 4])
  end
  return key, kind, limit, window
end
local function reserve(w)
  local now, rid = now_of(w[2]), w[3]
  local grant, least = tonumber(w[4]), tonumber(w[5])
  local key, kind, limit, window = limits_of(w, 6)
  local n, value = #key, {}
  for i = 1, n do
    if kind[i] == 'c' then
      redis.call('ZREMRANGEBYSCORE', key[i], '-inf', now)
      value[i] = redis.call('ZCARD', key[i])
    else
      value[i] = tonumber(redis.call('GET', key[i]) or '0')
    end
  end
  local blocked, retry = 0, 0
  for i = 1, n do
    if kind[i] == 'b' and blocked == 0 then
      local room = limit[i] - value[i]
      if room < least then blocked, retry = i, -1 end
      if room < grant then grant = math.max(room, 0) end
    end
  end
  local out, pre, new = {}, {}, {}
  for i = 1, n do
    local left, reset, held, since, wait, never = 0, 0, 0, 0, 0, false
    if kind[i] == 'r' or kind[i] == 't' then
      local cost = 1
      if kind[i] == 't' then cost = grant end
      local interval = window[i] / limit[i]
      local tat = math.max(value[i], now)
      new[i] = tat + cost * interval
      wait = new[i] - window[i] - now
      if cost > limit[i] then never = true end
      held, since = math.floor((now + window[i] - tat) / interval + eps), math.ceil(tat - now)
      left, reset = math.floor((now + window[i] - new[i]) / interval + eps), math.ceil(new[i] - now)
    elseif kind[i] == 'b' then
      left, held = math.max(limit[i] - value[i] - grant, 0), math.max(limit[i] - value[i], 0)
      reset, since = window[i], window[i]
    else
      if value[i] >= limit[i] then wait = 1000 end
      left, held = math.max(limit[i] - value[i] - 1, 0), math.max(limit[i] - value[i], 0)
    end
    if retry ~= -1 and never then
      blocked, retry = i, -1
    elseif retry ~= -1 and wait > eps and wait > retry then
      blocked, retry = i, wait
    end
    out[#out + 1], out[#out + 2] = left, reset
    pre[#pre + 1], pre[#pre + 2] = held, since
  end
  if blocked > 0 then
    if retry > 0 then retry = math.ceil(retry) end
    return {0, blocked, retry, grant, unpack(pre)}
  end
  for i = 1, n do
    if kind[i] == 'r' or kind[i] == 't' then
      if new[i] > now then
        local ttl = math.ceil(new[i] - now) + 1000
        redis.call('SET', key[i], string.format('%.3f', new[i]), 'PX', ttl)
      end
    elseif kind[i] == 'b' then
      if grant > 0 then
        redis.call('INCRBY', key[i], grant)
        redis.call('PEXPIRE', key[i], window[i] + 86400000)
      end
    else
      redis.call('ZADD', key[i], now + window[i], rid)
      redis.call('PEXPIRE', key[i], window[i])
    end
  end
  return {1, 0, 0, grant, unpack(out)}
end
local function settle(w)
  local now, rid, delta = now_of(w[2]), w[3], tonumber(w[4])
  local key, kind, limit, window = limits_of(w, 5)
  for i = 1, #key do
    if kind[i] == 'c' then
      redis.call('ZREM', key[i], rid)
    elseif kind[i] == 't' and delta ~= 0 then
      local tat = math.max(tonumber(redis.call('GET', key[i]) or '0'), now)
      tat = tat + delta * (window[i] / limit[i])
      if tat > now then
        redis.call('SET', key[i], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
      else
        redis.call('DEL', key[i])
      end
    elseif kind[i] == 'b' and delta ~= 0 and (delta > 0 or redis.call('EXISTS', key[i]) == 1) then
      redis.call('INCRBY', key[i], delta)
      if redis.call('PTTL', key[i]) < 0 then
        redis.call('PEXPIRE', key[i], window[i] + 86400000)
      end
    end
  end
  return 1
end
local replies = {}
for operation in string.gmatch(ARGV[1], '[^;]+') do
  local w = {}
  for word in string.gmatch(operation, '%S+') do w[#w + 1] = word end
  if w[1] == 'r' then replies[#replies + 1] = reserve(w) else replies[#replies + 1] = settle(w) end
end
return replies
"""
BATCH_SHA = hashlib.sha1(BATCH_LUA.encode(), usedforsecurity=False).hexdigest()
SERVER_CLOCK = "-"  # the now_ms of an operation that runs on the Redis server's clock


def reserve_operation(ask: Ask, stamp: str, words: str) -> str:
    """The batch script's text for a reservation; `words` are its limits' (`limit_words`)."""
    return f"r {stamp} {ask.request_id} {ask.tokens} {ask.least} {words}"


def settle_operation(reservation: Reservation, used: int, stamp: str, words: str) -> str:
    """The batch script's text for settling `reservation` at `used` tokens; `words` are its
    limits' (`limit_words`)."""
    return f"s {stamp} {reservation.request_id} {used - reservation.granted} {words}"


def is_reservation(operation: str) -> bool:
    return operation.startswith("r ")


def batch_argument(operations: Sequence[str]) -> str:
    """The script's one ARGV entry: the operations, in order."""
    return ";".join(operations)


def limit_words(limits: Sequence[Limit], slots: Sequence[int]) -> str:
    """The words of an operation's limits: their count, then `key_index kind limit window_ms`
    of each; `slots` are their keys' KEYS indexes."""
    words = [f"{slot} {lim.kind} {lim.limit} {lim.window_ms}"
             for lim, slot in zip(limits, slots, strict=True)]  # fmt: skip
    return f"{len(words)} {' '.join(words)}"


class Encoding:
    """How one tuple of limits goes into batches: its keys (hash tag included) and its words
    for the KEYS indexes it was given last, which most batches give again (each numbers its
    keys from 1, and concurrent requests of one caller share their limits). Kept by the
    backend across batches, so a batch encodes a caller's limits only when their indexes
    change; `batch` is the number of the batch whose indexes `words` holds."""

    __slots__ = ("limits", "keys", "indexes", "words", "batch")

    def __init__(self, tag: str, limits: tuple[Limit, ...]) -> None:
        self.limits = limits
        self.keys = [tag + lim.key for lim in limits]
        self.indexes: list[int] | None = None  # none yet: the words are still to encode
        self.words = ""
        self.batch = -1


class Batch:
    """Operations gathered for one script call on `loop`, and the futures their callers await.
    A settlement whose failure its caller does not hear (`add_settlement`) is one of `quiet`,
    with its queue time in `queued`: its future ends with None if the batch fails. `number`
    tells the batch apart from the backend's others (`Encoding.batch`)."""

    __slots__ = ("loop", "number", "slots", "operations", "waiters", "quiet", "queued")

    def __init__(self, loop: asyncio.AbstractEventLoop, number: int) -> None:
        self.loop = loop  # kept: each operation's future would look the running loop up again
        self.number = number
        self.slots: dict[str, int] = {}  # key -> its index in KEYS (from 1): each key sent once
        self.operations: list[str] = []
        self.waiters: list[asyncio.Future[Any]] = []
        self.quiet: list[asyncio.Future[Any]] = []
        self.queued: list[float] = []

    def words_of(self, encoding: Encoding) -> str:
        """The operation words of `encoding`'s limits in this batch: found for the batch's
        later operations, and encoded again only if their keys' indexes differ from last time."""
        if encoding.batch != self.number:
            slots = self.slots
            indexes = [slots.setdefault(key, len(slots) + 1) for key in encoding.keys]
            if indexes != encoding.indexes:
                encoding.indexes, encoding.words = indexes, limit_words(encoding.limits, indexes)
            encoding.batch = self.number
        return encoding.words

    def add(self, operation: str, flush: Callable[[Batch], None]) -> asyncio.Future[Any]:
        """Queues `operation`; the future gets its reply. A full batch is sent at once."""
        waiter = self.loop.create_future()
        self.operations.append(operation)
        self.waiters.append(waiter)
        if len(self.waiters) >= BATCH_SIZE:
            flush(self)
        return waiter

    def add_settlement(self, operation: str, queued: float) -> asyncio.Future[Any]:
        """Queues a settlement whose future ends when the batch is answered, failed or not
        (the caller of `flush` reports how it went); the caller sends a full batch."""
        waiter = self.loop.create_future()
        self.operations.append(operation)
        self.waiters.append(waiter)
        self.quiet.append(waiter)
        self.queued.append(queued)
        return waiter

    def to_send(self) -> list[int]:
        """Indexes of the operations to send: all but reservations whose caller is gone (the
        client went away); a settlement goes even then, to free what its request held."""
        operations, waiters = self.operations, self.waiters
        return [i for i, waiter in enumerate(waiters)
                if not waiter.cancelled() or not is_reservation(operations[i])]  # fmt: skip

    def resolve(self, sent: list[int], replies: Sequence[Any]) -> None:
        waiters = self.waiters
        for i, reply in zip(sent, replies, strict=True):
            waiter = waiters[i]
            if not waiter.done():  # done: its caller was cancelled meanwhile
                waiter.set_result(reply)

    def finish(self, task: asyncio.Task[None]) -> None:
        """Hands a failed (or cancelled) send to every caller still waiting."""
        cancelled = task.cancelled()
        error = None if cancelled else task.exception()
        if not cancelled and error is None:
            return
        if error is not None:
            for waiter in self.quiet:
                if not waiter.done():
                    waiter.set_result(None)
        for waiter in self.waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.cancel()
            else:
                waiter.set_exception(_own_copy(error))


def _own_copy(error: BaseException) -> BaseException:
    """Each caller raises its own error, so no traceback is shared between tasks."""
    if not isinstance(error, ServiceUnavailableError):
        return error
    copy = ServiceUnavailableError(error.message)
    copy.__cause__ = error.__cause__
    return copy
