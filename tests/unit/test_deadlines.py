"""`DeadlineWatch`: waits that outlive their limit end in `TimeoutError`, others are untouched,
and someone else's cancellation stays a cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.deadlines import DeadlineWatch


async def test_a_wait_past_its_limit_raises_timeout_error():
    watch = DeadlineWatch()
    started = time.monotonic()
    with pytest.raises(TimeoutError), watch.within(0.05):
        await asyncio.sleep(10)
    assert 0.04 <= time.monotonic() - started < 1


async def test_a_wait_within_its_limit_returns_and_its_task_goes_on():
    watch = DeadlineWatch()
    with watch.within(0.05):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the timer fired meanwhile: nothing is cancelled now
    assert asyncio.current_task().cancelling() == 0


async def test_a_shorter_limit_after_a_longer_one_fires_on_time():
    watch = DeadlineWatch()

    async def wait(seconds: float) -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError), watch.within(seconds):
            await asyncio.sleep(10)
        return time.monotonic() - started

    long = asyncio.create_task(wait(0.5))
    await asyncio.sleep(0.01)
    short = await wait(0.05)
    assert short < 0.3
    assert 0.45 <= await long < 2


async def test_many_waits_each_end_at_their_own_deadline():
    watch = DeadlineWatch()
    ended: dict[int, str] = {}

    async def wait(index: int) -> None:
        try:
            with watch.within(0.1):
                await asyncio.sleep(0.02 if index % 2 else 5)
            ended[index] = "done"
        except TimeoutError:
            ended[index] = "timeout"

    await asyncio.gather(*(wait(i) for i in range(50)))
    assert all(ended[i] == ("done" if i % 2 else "timeout") for i in range(50))


async def test_an_expired_wait_leaves_no_cancellation_pending_whatever_it_raised():
    watch = DeadlineWatch()
    with pytest.raises(ConnectionError), watch.within(0.05):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ConnectionError("a library's own error for the cancellation") from None
    assert asyncio.current_task().cancelling() == 0
    await asyncio.sleep(0.01)  # the task goes on: no cancellation is left to arrive


async def test_a_cancel_from_outside_stays_a_cancellation():
    watch = DeadlineWatch()

    async def wait() -> None:
        with watch.within(5):
            await asyncio.sleep(10)

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_expiry_together_with_an_outside_cancel_stays_a_cancellation():
    watch = DeadlineWatch()
    entered = asyncio.Event()

    async def wait() -> None:
        with watch.within(0.05):
            entered.set()
            try:
                await asyncio.sleep(10)
            finally:
                await asyncio.sleep(0.1)  # the deadline passes while this cleans up

    task = asyncio.create_task(wait())
    await entered.wait()
    await asyncio.sleep(0)
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
