"""The policy set in force, and the watcher that swaps in valid edits of its directory.

Owns loading at startup (a bad directory stops startup), polling the directory (including the
`..data` symlink swap Kubernetes does for ConfigMaps), validating a change in full off the event
loop and swapping it in atomically, and refusing an invalid change while the last good set stays.
Must not scan text or edit requests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import metrics
from gateway.audit import emit_security_event
from gateway.config import PolicySettings
from gateway.log import get_logger
from gateway.policies import PolicyError, PolicySet, load_policies, policy_files

log = get_logger("gateway.policies")
_CONFIGMAP_LINK = "..data"


def fingerprint(directory: Path) -> tuple[Any, ...]:
    """What changes when any policy file, or the ConfigMap's `..data` link, changes."""
    try:
        link = directory / _CONFIGMAP_LINK
        target = os.readlink(link) if link.is_symlink() else None
        stats = []
        for path in policy_files(directory):
            stat = path.stat()
            stats.append((path.name, stat.st_ino, stat.st_mtime_ns, stat.st_size))
        return (target, tuple(stats))
    except OSError as exc:
        return ("unreadable", exc.errno)


class PolicyStore:
    """Holds the current `PolicySet`; requests read `current` once and keep that reference."""

    def __init__(
        self,
        settings: PolicySettings,
        *,
        entities_available: bool = False,
        on_change: Callable[[PolicySet], None] | None = None,
    ) -> None:
        self._settings = settings
        self._entities = entities_available
        self._on_change = on_change
        self._current: PolicySet | None = None
        self._fingerprint: tuple[Any, ...] = ()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> PolicySet:
        if self._current is None:
            raise RuntimeError("the policy store is not open")
        return self._current

    async def open(self) -> None:
        """Loads the directory (PolicyError if invalid) and starts watching it."""
        directory = self._settings.directory
        self._fingerprint = await asyncio.to_thread(fingerprint, directory)
        self._swap(await asyncio.to_thread(self._load))
        log.info("policies_loaded", directory=str(directory), policy_set_hash=self.current.hash,
                 policies=len(self.current.policies), rules=self.current.rule_count)  # fmt: skip
        if self._settings.reload:
            self._task = asyncio.create_task(self._watch(), name="policy-watcher")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def reload(self) -> bool:
        """Validates the directory in full and swaps it in; False keeps the last good set."""
        old = self.current
        try:
            new = await asyncio.to_thread(self._load)
        except PolicyError as error:
            metrics.POLICY_RELOADS.labels("failed").inc()
            metrics.POLICY_RELOAD_FAILURES.inc()
            log.error("policy_reload_failed", policy_set_hash=old.hash,
                      problems=[str(p) for p in error.problems][:20])  # fmt: skip
            emit_security_event("policy_reload_failed", category="configuration",
                                outcome="failure", fields={"gateway.policy_set_hash": old.hash,
                                "gateway.problems": len(error.problems)})  # fmt: skip
            return False
        if new.hash == old.hash:
            return True
        self._swap(new)
        metrics.POLICY_RELOADS.labels("applied").inc()
        log.info("policy_reloaded", previous_hash=old.hash, policy_set_hash=new.hash,
                 policies=len(new.policies), rules=new.rule_count)  # fmt: skip
        emit_security_event("policy_reloaded", category="configuration", outcome="success",
                            fields={"gateway.previous_policy_set_hash": old.hash,
                                    "gateway.policy_set_hash": new.hash})  # fmt: skip
        return True

    def _load(self) -> PolicySet:
        settings = self._settings
        return load_policies(settings.directory, hold_cap=settings.hold_back_cap,
                             entities_available=self._entities)  # fmt: skip

    def _swap(self, new: PolicySet) -> None:
        self._current = new
        if self._on_change is not None:
            self._on_change(new)

    async def _watch(self) -> None:
        directory = self._settings.directory
        while not await self._stopped_after(self._settings.poll_interval):
            seen = await asyncio.to_thread(fingerprint, directory)
            if seen != self._fingerprint:
                self._fingerprint = seen
                await self.reload()

    async def _stopped_after(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return False
        return True
