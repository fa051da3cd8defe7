"""The pre-fork master of `gateway serve --workers N`: starts, watches and stops worker processes.

Owns the workers' lives: a fresh Prometheus multiprocess directory before the first one starts,
the listening port held open so restarts always get it back, restarting a worker that crashes,
and forwarding SIGTERM (a second one stops everything at once). Each worker is a fresh
`gateway serve --worker` interpreter that binds the same port with SO_REUSEPORT, so the kernel
spreads connections across them. Must not serve requests nor import the request path itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from gateway.config import Settings
from gateway.log import get_logger

log = get_logger("gateway.master")

PROMETHEUS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_POLL_SECONDS = 0.1
_MIN_UPTIME = 5.0
_MAX_FAST_CRASHES = 5
_KILL_GRACE = 2.0


@dataclass(slots=True)
class WorkerPlan:
    """How to start a worker: the settings it serves, its config file and the metrics directory."""

    settings: Settings
    config: Path | None
    metrics_dir: Path


@dataclass
class Master:
    """Keeps `count` workers running until told to stop; `run` returns the exit code."""

    plan: WorkerPlan
    count: int
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: dict[int, float] = field(default_factory=dict)
    signals: int = 0
    fast_crashes: int = 0

    def run(self) -> int:
        self._install_signals()
        for index in range(self.count):
            self._spawn(index)
        return self._supervise()

    def _install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def _spawn(self, index: int) -> None:
        process = subprocess.Popen(worker_command(self.plan))  # noqa: S603
        self.workers[index] = process
        self.started[index] = time.monotonic()
        log.info("worker_started", index=index, pid=process.pid)

    def _supervise(self) -> int:
        while self.signals == 0:
            if not self._restart_exited():
                self._stop()
                return 1
            time.sleep(_POLL_SECONDS)
        return self._stop()

    def _restart_exited(self) -> bool:
        """Restarts crashed workers; False once they crash too fast, too often, to go on."""
        for index, process in list(self.workers.items()):
            code = process.poll()
            if code is None:
                continue
            mark_process_dead(process.pid, str(self.plan.metrics_dir))  # type: ignore[no-untyped-call]
            uptime = time.monotonic() - self.started[index]
            self.fast_crashes = self.fast_crashes + 1 if uptime < _MIN_UPTIME else 0
            log.warning("worker_exited", index=index, pid=process.pid, code=code,
                        uptime_seconds=round(uptime, 3))  # fmt: skip
            if self.fast_crashes >= _MAX_FAST_CRASHES:
                log.error("workers_crash_looping", crashes=self.fast_crashes)
                return False
            time.sleep(min(0.1 * 2**self.fast_crashes, 5.0))
            self._spawn(index)
        return True

    def _stop(self) -> int:
        """Forwards SIGTERM, waits for the workers' own deadline; a second signal stops now."""
        server = self.plan.settings.server
        self._forward(signal.SIGTERM)
        forwarded = self.signals
        # Workers exit by themselves 2 s after their worst-case drain; this is the backstop.
        deadline = time.monotonic() + server.drain_delay + 2 * server.shutdown_timeout + 5
        log.info("workers_stopping", workers=len(self.workers))
        while self._alive() and time.monotonic() < deadline:
            if self.signals > forwarded:
                log.warning("workers_stopping_now")
                self._forward(signal.SIGTERM)
                self._kill_after(_KILL_GRACE)
                return 1
            time.sleep(_POLL_SECONDS)
        self._kill_after(0)
        codes = [process.returncode for process in self.workers.values()]
        log.info("workers_stopped", codes=codes)
        return 0 if all(code == 0 for code in codes) else 1

    def _alive(self) -> bool:
        return any(process.poll() is None for process in self.workers.values())

    def _forward(self, signum: int) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signum)

    def _kill_after(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._alive() and time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
        for process in self.workers.values():
            if process.poll() is None:
                process.kill()
            process.wait()


def run_master(settings: Settings, config: Path | None) -> int:
    """Runs `settings.server.workers` workers on one port until SIGTERM; returns the exit code."""
    server = settings.server
    metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    # prometheus_client picks its value class when imported, so each worker must see this
    # variable at start-up; the master's own collectors stay in memory and are never served.
    os.environ[PROMETHEUS_DIR_VARIABLE] = str(metrics_dir)
    held = hold_port(server.host, server.port)
    port = int(held.getsockname()[1])
    plan = WorkerPlan(
        settings.model_copy(update={"server": server.model_copy(update={"port": port})}),
        config,
        metrics_dir,
    )
    log.info("master_started", host=server.host, port=port, workers=server.workers,
             pid=os.getpid())  # fmt: skip
    try:
        return Master(plan, server.workers).run()
    finally:
        held.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def hold_port(host: str, port: int) -> socket.socket:
    """Binds (without listening) with SO_REUSEPORT: resolves port 0 and keeps the port ours.

    A bound socket that never listens receives no connections; the workers' listening
    sockets join the same SO_REUSEPORT group.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listeners do
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((host, port))
    return held


def worker_command(plan: WorkerPlan) -> list[str]:
    """The command line of one worker: the same config, told it is a worker of this master."""
    server = plan.settings.server
    command = [sys.executable, "-m", "gateway", "serve", "--worker",
               "--host", server.host, "--port", str(server.port),
               "--workers", str(server.workers),
               "--metrics-multiprocess-dir", str(plan.metrics_dir)]  # fmt: skip
    if plan.config is not None:
        command += ["--config", str(plan.config)]
    return command
