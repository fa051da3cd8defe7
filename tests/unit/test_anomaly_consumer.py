"""The anomaly detector's background consumer: it lingers to fill a batch (one read of the
store for more requests), up to a batch or `batch_linger` seconds, and a drain (shutdown)
reads whatever is queued at once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.anomaly import AnomalyDetector
from gateway.anomaly_state import MemoryStore, Observation, Reading, Step
from gateway.config import AnomalySettings

T0 = 1714554000.0


class CountingStore(MemoryStore):
    """The in-memory store, recording how many steps each read carried."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []

    async def read(self, steps: Sequence[Step]) -> list[Reading]:
        self.reads.append(len(steps))
        return await super().read(steps)


def consumer(linger: float) -> tuple[AnomalyDetector, CountingStore, list[object]]:
    store, raised = CountingStore(), list[object]()
    settings = AnomalySettings(batch_linger=linger)
    detector = AnomalyDetector(settings, store, raised.append, clock=lambda: T0)
    detector.start()
    return detector, store, raised


def leak(index: int) -> Observation:
    """A request of its own principal (one step each) that raises a canary leak."""
    return Observation(at=T0 + index, principal=f"ps_{index}", canary_leak=True)


@pytest.mark.parametrize(("linger", "reads"), [(0, [1, 1, 1, 1, 1]), (1, [5])])
async def test_requests_arriving_while_the_consumer_lingers_share_one_read(linger, reads):
    """Five requests 10 ms apart: without a linger, each is read as it comes; with one, the
    consumer still waits for more when the drain (the shutdown) asks it to read them."""
    detector, store, raised = consumer(linger)
    await asyncio.sleep(0)  # the consumer waits for work
    for index in range(5):
        detector.submit(leak(index))
        await asyncio.sleep(0.01)
    await asyncio.wait_for(detector.drain(), 0.5)
    assert store.reads == reads
    assert len(raised) == 5
    await detector.close()


async def test_a_full_batch_is_read_without_waiting_out_the_linger():
    detector, store, raised = consumer(1)
    await asyncio.sleep(0)
    for index in range(64):
        detector.submit(leak(index))
    await asyncio.sleep(0.2)  # far less than the linger
    assert store.reads == [64]
    assert len(raised) == 64
    await detector.close()


async def test_a_drain_reads_what_is_queued_at_once():
    detector, store, raised = consumer(1)
    await asyncio.sleep(0)
    detector.submit(leak(0))
    await asyncio.sleep(0.01)  # the consumer lingers, for up to 1 s
    await asyncio.wait_for(detector.drain(), 0.5)
    assert len(raised) == 1
    detector.submit(leak(1))
    await asyncio.wait_for(detector.close(), 0.5)
    assert len(raised) == 2, "closing analyses what is still queued"
