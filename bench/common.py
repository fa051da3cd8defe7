"""Shared helpers for the hand-run benchmarks in bench/.

Owns starting and stopping the processes under test, reading a process's own CPU time from
/proc, the load generators (wrk when installed, else an aiohttp client in a separate process),
and the statistics and table printing. Must not hold any one benchmark's scenario.

Run as a script it is the Python load generator:
`python bench/common.py loadgen --url U --body-file F --concurrency C (--duration S | --count N)`.
It warms up, prints `ready`, waits for `go` on stdin, runs, prints one JSON line of results and
waits for any line on stdin before closing its connections (so the caller can read the
servers' CPU counters before the connections are torn down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent
JSON_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench-client-key"}


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process (all its threads) has used, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Server:
    """A server process started by a benchmark; stopped (SIGTERM, then SIGKILL) on `stop`."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    name: str,
    argv: Sequence[str],
    url: str,
    *,
    ready_path: str = "",
    log_dir: Path,
    timeout: float = 20.0,
) -> Server:
    """Starts `argv` with its output in `log_dir/<name>.log` and waits until `url` answers."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
    server = Server(name, process, url, log_path)
    _wait_ready(server, url + ready_path, timeout)
    return server


def _wait_ready(server: Server, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.name} exited; the end of its output:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.name} did not become ready at {url}: see {server.log_path}")


def gateway_command() -> list[str]:
    """How to run the `gateway` CLI of this checkout."""
    return [sys.executable, "-m", "gateway"]


# --- load generation -----------------------------------------------------------------------


@dataclass
class RunResult:
    """One measured run: completed requests, wall time, and per-request latencies (seconds).

    For streams `latencies` holds the time to the first body chunk. `cpu` maps a server name
    to the CPU seconds it used during the run.
    """

    requests: int
    errors: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    tool: str = "python"

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    def cpu_ms_per_request(self, name: str) -> float:
        return 1000 * self.cpu[name] / self.requests if self.requests else float("nan")


def has_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, body: bytes, *, concurrency: int, duration: float, watch: Sequence[Server]
) -> RunResult:
    """A fixed-duration POST load with wrk (one thread) at `concurrency` connections."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_wrk_script(body))
        argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
                "-s", str(script), url]  # fmt: skip
        before = {s.name: s.cpu() for s in watch}
        output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        cpu = {s.name: s.cpu() - before[s.name] for s in watch}
    return _parse_wrk(output, cpu)


def _wrk_script(body: bytes) -> str:
    headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in JSON_HEADERS.items())
    return f'wrk.method = "POST"\nwrk.body = {json.dumps(body.decode())}\n{headers}'


def _parse_wrk(output: str, cpu: dict[str, float]) -> RunResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    if not done:
        raise RuntimeError(f"cannot read wrk output:\n{output}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[done.group(3)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    failed = int(errors.group(1)) if errors else 0
    if socket_errors:
        failed += sum(int(g) for g in socket_errors.groups())
    return RunResult(int(done.group(1)), failed, float(done.group(2)) * scale, cpu=cpu, tool="wrk")


def run_python(
    url: str,
    body: bytes,
    *,
    concurrency: int,
    watch: Sequence[Server],
    count: int = 0,
    duration: float = 0.0,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> RunResult:
    """Runs the aiohttp load generator in its own process; CPU is read around the measured part.

    `headers` are added to (or replace) the default JSON and Authorization headers."""
    with tempfile.NamedTemporaryFile(suffix=".json") as body_file:
        body_file.write(body)
        body_file.flush()
        argv = [
            sys.executable,
            __file__,
            "loadgen",
            "--url",
            url,
            "--body-file",
            body_file.name,
            "--concurrency",
            str(concurrency),
            "--count",
            str(count),
            "--duration",
            str(duration),
            "--headers",
            json.dumps(headers or {}),
        ]
        argv += ["--stream"] if stream else []
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
            assert child.stdin is not None and child.stdout is not None
            if child.stdout.readline().strip() != b"ready":
                raise RuntimeError("the load generator failed to warm up")
            before = {s.name: s.cpu() for s in watch}
            child.stdin.write(b"go\n")
            child.stdin.flush()
            line = child.stdout.readline()
            cpu = {s.name: s.cpu() - before[s.name] for s in watch}
            child.stdin.write(b"bye\n")
            child.stdin.flush()
    data = json.loads(line)
    return RunResult(data["requests"], data["errors"], data["elapsed"], data["latencies"], cpu)


async def _loadgen(args: argparse.Namespace, body: bytes) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    sent = {**JSON_HEADERS, **json.loads(args.headers)}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> float:
            started = time.perf_counter()
            async with session.post(args.url, data=body, headers=sent) as response:
                if args.stream:
                    await response.content.readany()
                    first = time.perf_counter()
                    while await response.content.readany():
                        pass
                    latency = first - started
                else:
                    await response.read()
                    latency = time.perf_counter() - started
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")
            return latency

        await _drive(one, args.concurrency, count=max(50, 2 * args.concurrency), duration=0.0)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        started = time.perf_counter()
        latencies, errors = await _drive(one, args.concurrency, args.count, args.duration)
        elapsed = time.perf_counter() - started
        result = {"requests": len(latencies), "errors": errors, "elapsed": elapsed,
                  "latencies": latencies}  # fmt: skip
        print(json.dumps(result), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)


async def _drive(
    one: Any, concurrency: int, count: int, duration: float
) -> tuple[list[float], int]:
    """Runs `one` from `concurrency` workers until `count` requests or `duration` seconds."""
    if not count and not duration:
        raise ValueError("give a request count or a duration")
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration if duration else float("inf")
    remaining = [count] if count else [-1]

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline and remaining[0] != 0:
            remaining[0] -= 1
            try:
                latencies.append(await one())
            except Exception:  # noqa: BLE001 - a failed request is counted, not fatal
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


# --- statistics and output -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt(value: float, digits: int = 3) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Prints a Markdown table (readable in a terminal and pasteable into the README)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = (
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        print("| " + " | ".join(cells) + " |")


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    loadgen = commands.add_parser("loadgen", help="the Python load generator")
    loadgen.add_argument("--url", required=True)
    loadgen.add_argument("--body-file", required=True)
    loadgen.add_argument("--concurrency", type=int, default=1)
    loadgen.add_argument("--count", type=int, default=0)
    loadgen.add_argument("--duration", type=float, default=0.0)
    loadgen.add_argument("--stream", action="store_true")
    loadgen.add_argument("--headers", default="{}", help="JSON object of extra headers")
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(_loadgen(args, Path(args.body_file).read_bytes()))


if __name__ == "__main__":
    main()
