"""Deadlines for the gateway's waits on providers: many waits, one loop timer.

Owns `DeadlineWatch`: cancelling the task of a wait that outlived its limit and turning that
cancellation into `TimeoutError` for that wait alone, as `asyncio.timeout` does. Must not know
HTTP or providers: `upstream` decides what is waited for and for how long.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Any

# uvloop's clock ticks in milliseconds: a timer may fire up to a tick before its deadline.
_SLACK = 0.001


class DeadlineWatch:
    """The waits in progress and their deadlines, checked by one timer due at the earliest.

    `asyncio.timeout`, or aiohttp's socket read timeout, arms and cancels a loop timer per
    wait (or per chunk received): about 3 µs each on uvloop. Here a wait costs a dict entry.
    The timer is re-armed only for a deadline earlier than the one it is set for; with one
    limit per provider, deadlines come in order and it fires about once per limit period.
    One wait per task at a time.
    """

    def __init__(self) -> None:
        self._waits: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def within(self, seconds: float) -> Wait:
        """A context for one wait of the current task: `TimeoutError` after `seconds`."""
        return Wait(self, seconds)

    def begin(self, seconds: float) -> asyncio.Task[Any]:
        """Watches the current task's wait for `seconds`; returns the task, for `end`.

        The loop is kept from the first call: Python 3.11's `asyncio.current_task()` without
        one makes a getpid system call to find it."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline needs a task")
        due = loop.time() + seconds
        self._waits[task] = due
        if due < self._due:
            self._arm(loop, due)
        return task

    def end(self, task: asyncio.Task[Any]) -> bool:
        """Stops watching `task`'s wait; True if its deadline passed and the task was
        cancelled for it."""
        if self._waits.pop(task, None) is not None:
            return False
        if task in self._expired:
            self._expired.remove(task)
            return True
        return False

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(due, self._check, loop)
        self._due = due

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._due = None, math.inf
        now = loop.time() + _SLACK
        earliest = math.inf
        for task, due in list(self._waits.items()):
            if due <= now:
                del self._waits[task]
                self._expired.add(task)
                task.cancel()
            elif due < earliest:
                earliest = due
        if earliest < math.inf:
            self._arm(loop, earliest)


class Wait:
    """One wait under a `DeadlineWatch` (a `with` block around the awaits it bounds)."""

    __slots__ = ("_watch", "_seconds", "_task")

    def __init__(self, watch: DeadlineWatch, seconds: float) -> None:
        self._watch = watch
        self._seconds = seconds
        self._task: asyncio.Task[Any] | None = None

    def __enter__(self) -> None:
        self._task = self._watch.begin(self._seconds)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: TracebackType | None
    ) -> None:
        task = self._task
        assert task is not None  # noqa: S101 - set by __enter__
        if not self._watch.end(task):
            return
        # Our cancellation is taken back whatever the wait raised (a library may have turned
        # it into an error of its own), so none stays pending on the task. It becomes
        # TimeoutError; one also asked for by someone else (the client went away) stays a
        # cancellation, as with asyncio.timeout.
        if task.uncancel() == 0 and kind is asyncio.CancelledError:
            raise TimeoutError("deadline passed") from error
