"""The anomaly detectors' state in Redis, shared by every replica.

Owns the batch scripts (a batch's visits and window events, in order, in one EVALSHA; its
writes, baselines then cooldown claims, in one more), their encoding and the decoding of
their replies, on a `gateway.redis_line` connection of its own (the client's path on
Cluster). Redis errors become `ServiceUnavailableError` here. Must give exactly what
`MemoryStore` gives; must not score anything.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.anomaly_state import (
    METRICS,
    STATE_TTL,
    Baseline,
    Claim,
    Reading,
    Rolled,
    Save,
    Step,
    Visit,
    Visited,
)
from gateway.config import RedisSettings
from gateway.errors import ServiceUnavailableError
from gateway.redis_client import open_redis
from gateway.redis_line import RedisLine, packed

# The one script a batch is read with: its requests' visits and window events, in order,
# atomically. KEYS: every key the batch uses, once. ARGV[1]: JSON [ttls, ops], ttls[i] the TTL
# of KEYS[i] (set once, at the end). An op is a visit {1, minute hash, hours hash (KEYS
# indexes), minute, hour, now, indexes in `sets` of the members counting as new models, sets
# (KEYS indexes), their members, metric names, values, requests} or a window event {2, sorted
# set, now, now - window, member}. A visit adds the members (new or not), rolls the minute (a
# new minute returns the closed one's counts and starts afresh), adds the new models to the
# values and its requests to the hour. Returns JSON, per op in order: a visit's {closed counts
# or false, counts after it (both in names order), new flags, the minute hash's
# `_STATE_FIELDS` (false if missing), the hours hash before it}, the last two only the first
# time the batch uses the key, else false (the baselines in the minute hash do not change
# during the script, and a later visit adds its requests to its hour); a window's count of
# events.
_STATE_FIELDS = ["history", *(f"{part}:{m}" for m in METRICS for part in "edn")]
_READ = """
local state_fields = {STATE_FIELDS}
local batch = cjson.decode(ARGV[1])
local ttls, ops, out, sent, minutes = batch[1], batch[2], {}, {}, {}
local function visit(op)
  local m, h, minute = KEYS[op[2]], KEYS[op[3]], op[4]
  local sets, members, names, values = op[8], op[9], op[10], op[11]
  local new = {}
  for i = 1, #sets do new[i] = redis.call('SADD', KEYS[sets[i]], members[i]) end
  local models = op[7]
  if #models > 0 then
    local added = 0
    for i = 1, #models do added = added + new[models[i]] end
    names[#names + 1], values[#values + 1] = 'models', added
  end
  local current = minutes[m] or tonumber(redis.call('HGET', m, 'minute') or '-1')
  local closed = false
  if current < minute then
    if current >= 0 then
      closed = {}
      for i = 1, #names do closed[i] = redis.call('HGET', m, 'c:' .. names[i]) or '0' end
    end
    for i = 1, #names do redis.call('HDEL', m, 'c:' .. names[i]) end
    redis.call('HSET', m, 'minute', minute)
    current = minute
  end
  minutes[m] = current
  local counts = {}
  for i = 1, #names do counts[i] = redis.call('HINCRBYFLOAT', m, 'c:' .. names[i], values[i]) end
  local state, hours = false, false
  if not sent[m] then
    sent[m], state = true, redis.call('HMGET', m, unpack(state_fields))
    redis.call('HSETNX', h, 'first', op[6])
    hours = redis.call('HGETALL', h)
  end
  redis.call('HINCRBY', h, op[5], op[12])
  return {closed, counts, new, state, hours}
end
local function window(op)
  local key = KEYS[op[2]]
  redis.call('ZADD', key, op[3], op[5])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', op[4])
  return redis.call('ZCARD', key)
end
for i = 1, #ops do
  if ops[i][1] == 1 then out[i] = visit(ops[i]) else out[i] = window(ops[i]) end
end
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttls[i]) end
return cjson.encode(out)
""".replace("STATE_FIELDS", ", ".join(f"'{name}'" for name in _STATE_FIELDS))
_HOURS = {str(hour): hour for hour in range(24)}  # hours hash field -> hour of the day
_BASELINE_AT = [(m, _STATE_FIELDS.index(f"e:{m}")) for m in METRICS]  # then d:, n:
_READ_SHA = hashlib.sha1(_READ.encode(), usedforsecurity=False).hexdigest()
# The one script a batch's changes are written with, atomically: the baselines (HSET of each
# minute hash's fields), then the cooldown claims in order, each won unless the last claim
# won ends after its time. KEYS: the minute hashes, then the claims' keys. ARGV[1]: JSON
# [saves (each a flat list of fields and values), claims (each [now, cooldown])]. Returns
# per claim 1 (won) or 0.
_WRITE = """
local batch = cjson.decode(ARGV[1])
local saves, claims, won = batch[1], batch[2], {}
for i = 1, #saves do redis.call('HSET', KEYS[i], unpack(saves[i])) end
for i = 1, #claims do
  local key, now, cooldown = KEYS[#saves + i], claims[i][1], claims[i][2]
  won[i] = 0
  if tonumber(redis.call('GET', key) or '-1') <= now then
    redis.call('SET', key, now + cooldown, 'EX', math.ceil(cooldown) + 60)
    won[i] = 1
  end
end
return won
"""
_WRITE_SHA = hashlib.sha1(_WRITE.encode(), usedforsecurity=False).hexdigest()
_SCRIPTS = (_READ, _WRITE)


@dataclass(slots=True)
class _Ops:
    """A batch on its way to `_READ`: every key once (with its TTL), and the operations."""

    keys: dict[str, int] = field(default_factory=dict)
    ttls: list[int] = field(default_factory=list)
    ops: list[list[Any]] = field(default_factory=list)
    nows: dict[float, str] = field(default_factory=dict)  # a time's repr, made once a batch

    def now(self, at: float) -> str:
        """`repr(at)` (a principal's and its tenant's visits mostly share it)."""
        text = self.nows.get(at)
        if text is None:
            text = self.nows[at] = repr(at)
        return text

    def slot(self, key: str, ttl: int) -> int:
        """The key's index in KEYS (from 1); its TTL is the last one given, as if set each time."""
        slot = self.keys.get(key)
        if slot is None:
            slot = self.keys[key] = len(self.ttls) + 1
            self.ttls.append(ttl)
        self.ttls[slot - 1] = ttl
        return slot


class RedisStore:
    """State shared by every replica; Redis errors become `ServiceUnavailableError` here.

    A batch is read with one EVALSHA of `_READ` (applied atomically, in order) and written
    with one of `_WRITE`: at most two round trips per batch. Every key carries one hash tag, so on
    Redis Cluster a batch's keys share a slot (all detector state sits on one shard)."""

    def __init__(self, settings: RedisSettings, prefix: str = "{gateway:anomaly}:") -> None:
        self._redis = open_redis(settings)
        # The read on a connection of its own (a quarter of redis-py's per-command cost);
        # Cluster keeps the client's path, which finds the slot's shard.
        redis = self._redis
        self._line = RedisLine(redis, settings.timeout) if isinstance(redis, Redis) else None
        self._deadline = settings.timeout + settings.connect_timeout
        self._prefix = prefix
        self._ids = itertools.count()

    async def read(self, steps: Sequence[Step]) -> list[Reading]:
        if not steps:
            return []
        ops = _Ops()
        add = ops.ops.append
        for step in steps:  # (loops: a comprehension per step costs more than it saves)
            for visit in step.visits:
                add(self._visit_op(ops, visit, step))
            for key, window in step.windows:
                add(self._window_op(ops, key, window, step.now))
        if not ops.ops:  # nobody to follow (anonymous requests that only matched rules)
            return [Reading([], []) for _ in steps]
        reply = await self._read(list(ops.keys), orjson.dumps([ops.ttls, ops.ops]))
        return _readings(steps, orjson.loads(reply))

    async def _read(self, keys: list[str], payload: bytes) -> Any:
        return await self._script(_READ_SHA, keys, payload)

    async def _script(self, sha: str, keys: list[str], payload: bytes) -> Any:
        try:
            try:
                return await self._evalsha(sha, keys, payload)
            except NoScriptError:  # Redis restarted or flushed its scripts: load, run again
                for script in _SCRIPTS:  # both, so that a batch's write finds its script too
                    await self._redis.execute_command("SCRIPT", "LOAD", script)
                return await self._evalsha(sha, keys, payload)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise ServiceUnavailableError("Anomaly state in Redis is unavailable.") from exc

    async def _evalsha(self, sha: str, keys: list[str], payload: bytes) -> Any:
        line = self._line
        if line is None or line.busy:  # Cluster, or two calls at once (`observe` in tests)
            return await self._redis.execute_command("EVALSHA", sha, len(keys), *keys,
                                                     payload)  # fmt: skip
        command = packed(["EVALSHA", sha, str(len(keys)), *keys, payload.decode()])
        return await line.run(command, self._deadline)

    def _visit_op(self, ops: _Ops, visit: Visit, step: Step) -> list[Any]:
        prefix, slot, new_model = self._prefix, ops.slot, visit.new_model
        minute = slot(prefix + "m:" + visit.key, STATE_TTL)
        hours = slot(prefix + "h:" + visit.key, STATE_TTL)
        sets, members, models = [], [], []  # models: indexes (from 1) of new-model members
        for index, (key, member, ttl) in enumerate(visit.seen, 1):
            sets.append(slot(prefix + "s:" + key, int(ttl) + 1))
            members.append(member)
            if key == new_model:
                models.append(index)
        counts = visit.counts
        return [1, minute, hours, step.minute, str(step.hour), ops.now(step.now), models, sets,
                members, list(counts), list(counts.values()), visit.requests]  # fmt: skip

    def _window_op(self, ops: _Ops, key: str, window: float, now: float) -> list[Any]:
        slot = ops.slot(self._prefix + "w:" + key, int(window) + 60)
        member = f"{now!r}:{next(self._ids)}:{id(self)}"
        return [2, slot, repr(now), repr(now - window), member]

    async def write(self, saves: Sequence[Save], claims: Sequence[Claim]) -> list[bool]:
        if not saves and not claims:
            return []
        keys = [self._prefix + "m:" + save.key for save in saves]
        keys += [self._prefix + "c:" + claim.key for claim in claims]
        payload = orjson.dumps([[_save_fields(save) for save in saves],
                                [[claim.now, claim.cooldown] for claim in claims]])  # fmt: skip
        return [bool(won) for won in await self._script(_WRITE_SHA, keys, payload)]

    async def close(self) -> None:
        if self._line is not None:
            await self._line.close()
        await self._redis.aclose()


def _save_fields(save: Save) -> list[str]:
    """An identity's baselines and history as its minute hash's fields and values."""
    values: list[str] = ["history", str(save.history)]
    for metric, base in save.baselines.items():
        values += [f"e:{metric}", repr(base.mean), f"d:{metric}", repr(base.spread),
                   f"n:{metric}", str(base.count)]  # fmt: skip
    return values


@dataclass(slots=True)
class _Known:
    """Per identity, the baselines and the hourly counts `_READ` sent the first time a batch
    used it; each later visit of the batch sees the same baselines and its hour grown by the
    requests of the visits before."""

    baselines: dict[str, tuple[dict[str, Baseline], int]] = field(default_factory=dict)
    hours: dict[str, tuple[list[float], float]] = field(default_factory=dict)

    def visited(self, visit: Visit, hour: int, reply: list[Any]) -> Visited:
        closed, counts, new, state, hours = reply
        if state:
            self.baselines[visit.key] = _baselines(state)
        if hours:
            self.hours[visit.key] = _hours(hours)
        # Shared by the identity's visits in the batch: the detector never changes a Rolled's
        # baselines in place (it folds into a new mapping).
        baselines, history = self.baselines[visit.key]
        counted, first = self.hours[visit.key]
        before = counted.copy()
        counted[hour] += visit.requests
        names = list(visit.counts)
        if len(counts) > len(names):  # the script added the `models` count
            names.append("models")
        current = dict(zip(names, map(float, counts), strict=True))
        ended = dict(zip(names, map(float, closed), strict=True)) if closed else None
        added = list(map(bool, new)) if isinstance(new, list) else []  # cjson: {} when empty
        added += [False] * (len(visit.seen) - len(added))
        return Visited(Rolled(current, ended, baselines, history), added, (before, first))


def _readings(steps: Sequence[Step], replies: list[Any]) -> list[Reading]:
    """Each step's `Reading`, from `_READ`'s replies (one per visit, then one per window)."""
    known, answers = _Known(), iter(replies)
    readings = []
    for step in steps:
        visited = [known.visited(visit, step.hour, next(answers)) for visit in step.visits]
        recent = [int(next(answers)) for _ in step.windows] if step.windows else []
        readings.append(Reading(visited, recent))
    return readings


def _baselines(values: list[str | bool]) -> tuple[dict[str, Baseline], int]:
    """The baselines and history in an identity's minute hash (its `_STATE_FIELDS`)."""
    baselines = {
        m: Baseline(float(values[at]), float(values[at + 1]), int(values[at + 2]))
        for m, at in _BASELINE_AT if values[at]
    }  # fmt: skip
    return baselines, int(values[0] or 0)


def _hours(flat: list[str]) -> tuple[list[float], float]:
    """The 24 hourly counts and the first use in an identity's hours hash (HGETALL's list):
    its fields are `first` and the hours counted so far, often one or two."""
    hours, first = [0.0] * 24, None
    for index in range(0, len(flat), 2):
        name = flat[index]
        if name == "first":
            first = flat[index + 1]
        elif name in _HOURS:
            hours[_HOURS[name]] = float(flat[index + 1])
    if first is None:
        raise KeyError("first")  # the script sets it before it reads the hash
    return hours, float(first)
