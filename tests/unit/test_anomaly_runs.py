"""An established identity's requests of one minute, analysed together as one run: the
requests each raises are those one-by-one analysis raises, whether the run's counts only
grow (the last request's counts tell whether any request scores) or not (negative tokens
from an upstream)."""

from __future__ import annotations

import pytest

from gateway.anomaly import Anomaly, AnomalyDetector
from gateway.anomaly_state import MemoryStore, Observation
from gateway.config import AnomalySettings

T0 = 1714554000.0  # 2024-05-01 09:00:00 UTC


def steady_then(last_minute: list[int]) -> list[Observation]:
    """Three steady minutes of ps_alice (four requests of ~250 tokens), then one minute
    whose requests carry `last_minute` tokens, five seconds apart."""
    found = [Observation(T0 + minute * 60 + slot * 15, "ps_alice", "acme", tokens=250 + slot)
             for minute in range(3) for slot in range(4)]  # fmt: skip
    found += [Observation(T0 + 180 + index * 5, "ps_alice", "acme", tokens=tokens)
              for index, tokens in enumerate(last_minute)]  # fmt: skip
    return found


async def raised_by(
    traffic: list[Observation], *, together: bool, settings: AnomalySettings | None = None
) -> list[Anomaly]:
    """What analysing `traffic` one by one raises, or in two batches: all but the last
    minute's requests, then those."""
    raised: list[Anomaly] = []
    settings = settings or AnomalySettings(min_history=2, first_use=False)
    detector = AnomalyDetector(settings, MemoryStore(), raised.append)
    if together:
        last = int(traffic[-1].at // 60)
        split = next(i for i, obs in enumerate(traffic) if int(obs.at // 60) == last)
        await detector.observe_batch(traffic[:split])
        await detector.observe_batch(traffic[split:])
    else:
        for obs in traffic:
            await detector.observe(obs)
    return raised


@pytest.mark.parametrize(
    "tokens",
    [
        [250, 260, 240],  # quiet: nothing scores
        [250, 300, 2000, 250, 250],  # crosses the threshold at the third request
        [250, 9000, -9000, 250],  # the third takes the count back down: not monotonic
        [9000, 250, -9000],  # only the first two score
    ],
)
async def test_a_run_raises_what_its_requests_raise_one_by_one(tokens):
    traffic = steady_then(tokens)
    alone = await raised_by(traffic, together=False)
    assert await raised_by(traffic, together=True) == alone
    if max(tokens) > 1000:  # once per identity (then the cooldown)
        assert [(a.detector, a.kind) for a in alone] == [
            ("tokens_per_minute", "principal"),
            ("tokens_per_minute", "tenant"),
        ]


@pytest.mark.parametrize("hour", [9, 11])
async def test_a_run_at_a_usual_or_unusual_hour_raises_what_one_by_one_raises(hour):
    """Twenty minutes of ps_alice at 09:00, then five requests at `hour` (11:00 is one she
    never used: each is flagged, until the cooldown)."""
    traffic = [Observation(T0 + minute * 60, "ps_alice", "acme") for minute in range(20)]
    start = T0 + (hour - 9) * 3600 + 25 * 60
    traffic += [Observation(start + index, "ps_alice", "acme") for index in range(5)]
    settings = AnomalySettings(min_history=1000, hour_min_days=0.01)
    alone = await raised_by(traffic, together=False, settings=settings)
    assert await raised_by(traffic, together=True, settings=settings) == alone
    assert [a.detector for a in alone] == ["unusual_hour"] * 2 * (hour == 11)
