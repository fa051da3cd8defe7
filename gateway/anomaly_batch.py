"""A batch of finished requests as the anomaly store reads it: one visit per identity and
minute, and each request's own view recovered from its visit's reading.

Owns grouping a batch into runs (consecutive requests of one identity in one minute), the
`Visit` that stands for a run (summed counts, each member once), the steps of rule-window
events, and, from a run's `Visited`, what each of its requests would have read one by one:
its minute's counts, which of its members were new, and the hourly counts before it; and
`Folded`, the baselines the batch folded, which its later requests read before they are
written. The counts are whole numbers, so the sums and differences are exact. Must not
score anything (`gateway.anomaly` does) nor touch a store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.anomaly_state import (
    STATE_TTL,
    Observation,
    Rolled,
    Save,
    Seen,
    Step,
    Visit,
    Visited,
    Window,
)

ADDED = ("requests", "tokens", "errors", "violations", "redactions")
"""What every request adds to its identity's minute; `models` is counted by the store."""
_MINUTE_MEMBERS_TTL = 120  # seconds a minute's set of models outlives it


_FAILED = (401, 403, 429)  # statuses below 500 that count as errors


def added(obs: Observation) -> tuple[float, ...]:
    """What one request adds to each of `ADDED`."""
    failed = obs.status >= 500 or obs.status in _FAILED
    return 1.0, float(obs.tokens), float(failed), float(obs.violations), float(obs.redactions)


@dataclass(slots=True)
class Run:
    """Consecutive requests of one identity in one minute of a batch (positions in it), the
    visit that stands for them and, per member of the visit, the request (index in the run)
    that added it first."""

    kind: str
    ident: str
    minute: int
    positions: list[int] = field(default_factory=list)
    visit: Visit | None = None
    firsts: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.ident}"

    @property
    def hour(self) -> int:
        """The hour of the day (UTC) of the run's minute."""
        return self.minute // 60 % 24

    @property
    def seen(self) -> tuple[Seen, ...]:
        return self.visit.seen if self.visit is not None else ()


@dataclass(slots=True)
class Plan:
    """A batch's steps for the store, and what each step stands for: a run, or the position
    of the request whose rule-window events it carries."""

    steps: list[Step] = field(default_factory=list)
    owners: list[Run | int] = field(default_factory=list)


def plan(
    batch: Sequence[Observation],
    windows: Sequence[tuple[int, tuple[Window, ...]]],
    *,
    first_use: bool,
) -> Plan:
    """One step per run, in the order the runs start, and one per request with window
    events (`windows`: their positions in the batch, in order, and events). Reordering steps
    of different keys changes nothing; a run ends where its identity's next request has
    another minute, so each key's steps keep their order."""
    result = Plan()
    tally = _Tally([], (), [])
    for run in _runs(batch):
        if run.positions != tally.positions:  # a tenant's run is often its principal's
            tally = _tally(run.positions, batch, first_use)
        run.visit, run.firsts = _visit(run, tally, first_use)
        at = batch[run.positions[0]].at
        result.steps.append(Step((run.visit,), run.minute, run.hour, at))
        result.owners.append(run)
    for position, events in windows:
        at = batch[position].at
        result.steps.append(Step((), int(at // 60), int(at // 3600) % 24, at, events))
        result.owners.append(position)
    return result


def _runs(batch: Sequence[Observation]) -> list[Run]:
    """The batch's runs in the order they start (at one request: its principal's first)."""
    runs: list[Run] = []
    principals, tenants = _Current("principal", runs), _Current("tenant", runs)
    for position, obs in enumerate(batch):
        minute = int(obs.at // 60)
        if obs.principal:
            principals.join(obs.principal, minute, position)
        if obs.tenant:
            tenants.join(obs.tenant, minute, position)
    return runs


class _Current:
    """The run each identity of one kind is in, while a batch is cut into runs."""

    __slots__ = ("_kind", "_runs", "_by_ident")

    def __init__(self, kind: str, runs: list[Run]) -> None:
        self._kind = kind
        self._runs = runs  # every kind's runs, in the order they start
        self._by_ident: dict[str, Run] = {}

    def join(self, ident: str, minute: int, position: int) -> None:
        """Adds `position` to `ident`'s run, starting a new one at its first request or when
        the minute moved on."""
        run = self._by_ident.get(ident)
        if run is None or run.minute != minute:
            run = self._by_ident[ident] = Run(self._kind, ident, minute)
            self._runs.append(run)
        run.positions.append(position)


@dataclass(slots=True)
class _Tally:
    """What requests (positions in a batch) add, summed: the totals of `ADDED` and, in the
    order adding them one by one finds them, each new model and endpoint (0 and 1) with the
    request (index in `positions`) that brought it first."""

    positions: list[int]
    totals: tuple[float, ...]
    members: list[tuple[int, int, str]]


def _tally(positions: list[int], batch: Sequence[Observation], first_use: bool) -> _Tally:
    """(What `added` gives each request, summed in one pass: whole numbers, so exactly.)"""
    tokens = errors = violations = redactions = 0
    models: set[str] = set()
    endpoints: set[str] = set()
    members: list[tuple[int, int, str]] = []
    for request, position in enumerate(positions):
        obs = batch[position]
        tokens += obs.tokens
        status = obs.status
        if status >= 500 or status in _FAILED:
            errors += 1
        violations += obs.violations
        redactions += obs.redactions
        model, endpoint = obs.model, obs.endpoint
        if model is not None and model not in models:
            models.add(model)
            members.append((request, 0, model))
        if first_use and endpoint is not None and endpoint not in endpoints:
            endpoints.add(endpoint)
            members.append((request, 1, endpoint))
    totals = (float(len(positions)), float(tokens), float(errors), float(violations),
              float(redactions))  # fmt: skip
    return _Tally(positions, totals, members)


def _visit(run: Run, tally: _Tally, first_use: bool) -> tuple[Visit, list[int]]:
    """The run as one visit, and for each of its members the request (index in the run) that
    added it first. (A request's model is new to the minute's set exactly when it is new to
    the identity's set of models in the run, so one set of models stands for both.)"""
    base = f"{run.kind}:{run.ident}"
    minute_models = f"mm:{base}:{run.minute}"
    models, endpoints = f"models:{base}", f"endpoints:{base}"
    counts = dict(zip(ADDED, tally.totals, strict=True))
    seen: list[Seen] = []
    firsts: list[int] = []
    new_model = None
    for request, kind, member in tally.members:
        if kind == 1:
            seen.append((endpoints, member, STATE_TTL))
            firsts.append(request)
            continue
        new_model = minute_models
        seen.append((minute_models, member, _MINUTE_MEMBERS_TTL))
        firsts.append(request)
        if first_use:
            seen.append((models, member, STATE_TTL))
            firsts.append(request)
    if new_model is None:
        counts["models"] = 0.0
    return Visit(base, counts, tuple(seen), new_model, len(run.positions)), firsts


@dataclass(slots=True)
class Folded:
    """The baselines a batch folded and has not written yet, per identity key: its later
    requests take them from here, where one by one they would read them back from the store."""

    latest: dict[str, Rolled] = field(default_factory=dict)

    def carry(self, key: str, rolled: Rolled) -> Rolled:
        kept = self.latest.get(key)
        if kept is None:
            return rolled
        return Rolled(rolled.current, rolled.closed, kept.baselines, kept.history)

    def keep(self, key: str, rolled: Rolled) -> None:
        self.latest[key] = rolled

    def saves(self) -> list[Save]:
        return [Save(key, rolled.baselines, rolled.history) for key, rolled in self.latest.items()]


def minute_counts(
    run: Run, batch: Sequence[Observation], visited: Visited, added_by: dict[int, set[str]]
) -> list[dict[str, float]]:
    """Each request's minute counts right after it, as one-by-one reads would have found
    them: the counts after the run, less the run's own, plus what came up to the request.
    `added_by` is `new_members` of the run: a request adds one to `models` when it was the
    first to add a new member to the minute's set of models (it has one model at most)."""
    assert run.visit is not None  # noqa: S101 - a planned run has its visit
    new_model = run.visit.new_model
    models = [
        float(new_model in added_by.get(request, ())) for request in range(len(run.positions))
    ]
    after = visited.rolled.current
    running = {name: after.get(name, 0.0) - run.visit.counts[name] for name in ADDED}
    running["models"] = after.get("models", 0.0) - sum(models)
    found = []
    for request, position in enumerate(run.positions):
        for name, value in zip(ADDED, added(batch[position]), strict=True):
            running[name] += value
        running["models"] += models[request]
        found.append(dict(running))
    return found


def new_members(run: Run, visited: Visited) -> dict[int, set[str]]:
    """Per request (index in the run), the sets it added a new member to."""
    found: dict[int, set[str]] = {}
    for (key, _, _), new, request in zip(run.seen, visited.new, run.firsts, strict=True):
        if new:
            found.setdefault(request, set()).add(key)
    return found
