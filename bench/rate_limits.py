"""The cost of rate limiting: the gateway with limits off, on Redis, and in memory, in one run.

Starts, as separate processes, a private redis-server, the demo provider and four gateways in
front of it that differ only in `limits`: `off`; `redis-req` (requests per second and minute
for the key and globally: one reservation, no settlement); `redis-all` (those plus tokens per
minute, a daily budget and concurrency: a reservation before and a settlement after); and
`memory-all` (the same limits in process memory). In rounds, alternating the targets, it
measures requests/s at concurrency 32, latency at concurrency 1, each gateway's own CPU time
per request (and Redis's) from /proc/<pid>/stat, and the Redis commands per request from the
`INFO commandstats` delta. Limits are set high so no request is refused. Prints medians over
rounds and ratios against `off`.

`python bench/rate_limits.py [--rounds 5] [--duration 3] [--requests 1000]`
Target: at most one Redis round trip per request for request limits (two with token limits
or concurrency: reserve and settle); under concurrency, batches make it far fewer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis
from common import (
    RunResult,
    Server,
    cpu_seconds,
    fmt,
    free_port,
    gateway_command,
    median,
    percentile,
    print_table,
    ratio,
    run_python,
    start_server,
)
from proxy import gateway_config

TARGETS = ("off", "redis-req", "redis-all", "memory-all")
CHAT_PATH = "/v1/chat/completions"
HIGH = 10_000_000
REQUEST_LIMITS = {"requests_per_second": HIGH, "requests_per_minute": HIGH}
ALL_LIMITS = {**REQUEST_LIMITS, "tokens_per_minute": HIGH, "daily_tokens": HIGH,
              "concurrent": HIGH}  # fmt: skip


def main() -> int:
    args = _parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        redis_port = free_port()
        store = _start_redis(Path(tmp), redis_port)
        servers: dict[str, Server] = {}
        try:
            servers = _start(Path(tmp), redis_port)
            results, trips = _measure(servers, store, redis_port, args)
        finally:
            for server in servers.values():
                server.stop()
            store.kill()
            store.wait()
    _report(results, trips, args)
    return 0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of all measurements")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per c=32 run")
    parser.add_argument("--requests", type=int, default=1000, help="requests per c=1 run")
    return parser.parse_args()


def _start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            subprocess.run(["sleep", "0.05"], check=True)
    client.close()
    return process


def _start(tmp: Path, redis_port: int) -> dict[str, Server]:
    demo_port = free_port()
    demo_url = f"http://127.0.0.1:{demo_port}"
    servers = {"demo": start_server("demo", [*gateway_command(), "demo-provider", "--port",
                                             str(demo_port)],
                                    demo_url, ready_path="/v1/models", log_dir=tmp)}  # fmt: skip
    for target in TARGETS:
        port = free_port()
        config = gateway_config(demo_url, port)
        config["limits"] = _limits(target)
        config["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
        path = tmp / f"{target}.yaml"
        path.write_text(json.dumps(config))
        servers[target] = start_server(
            target, [*gateway_command(), "serve", "--config", str(path)],
            f"http://127.0.0.1:{port}", ready_path="/healthz", log_dir=tmp,
        )  # fmt: skip
    return servers


def _limits(target: str) -> dict[str, Any]:
    if target == "off":
        return {"enabled": False}
    values = REQUEST_LIMITS if target == "redis-req" else ALL_LIMITS
    return {"enabled": True, "backend": "memory" if target.startswith("memory") else "redis",
            "tiers": {"bench": values}, "assignment": {"default_tier": "bench"},
            "global": REQUEST_LIMITS}  # fmt: skip


def _body() -> bytes:
    content = "benchmark the rate limiter " * 4
    body = {"model": "gpt-4o-mini", "max_tokens": 64,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    return json.dumps(body).encode()


# Commands the limiter's scripts run inside EVALSHA: commandstats counts them too, but they
# are no round trips. The gateway never sends them itself.
IN_SCRIPT = {"get", "set", "incrby", "pexpire", "zadd", "zrem", "zremrangebyscore", "zcard",
             "exists", "pttl", "del", "time", "info"}  # fmt: skip


def _commands(port: int) -> int:
    """Commands clients sent to Redis (round trips), not counting INFO itself."""
    client = redis.Redis(port=port)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items()
               if k.removeprefix("cmdstat_") not in IN_SCRIPT)  # fmt: skip


Key = tuple[int, str]


def _measure(
    servers: dict[str, Server], store: subprocess.Popen[bytes], redis_port: int,
    args: argparse.Namespace,
) -> tuple[dict[Key, list[RunResult]], dict[str, list[float]]]:  # fmt: skip
    results: dict[Key, list[RunResult]] = defaultdict(list)
    trips: dict[str, list[float]] = defaultdict(list)
    body = _body()
    for index in range(args.rounds):
        order = TARGETS[index % len(TARGETS) :] + TARGETS[: index % len(TARGETS)]
        for load in (1, 32):
            for target in order:
                server = servers[target]
                before, cpu_before = _commands(redis_port), cpu_seconds(store.pid)
                run = run_python(server.url + CHAT_PATH, body, concurrency=load,
                                 count=args.requests if load == 1 else 0,
                                 duration=0.0 if load == 1 else args.duration,
                                 watch=[server])  # fmt: skip
                if run.errors:
                    tail = server.log_path.read_text().splitlines()[-5:]
                    raise RuntimeError(f"{target} c={load}: {run.errors} errors; log tail:\n"
                                       + "\n".join(tail))  # fmt: skip
                run.cpu["redis"] = cpu_seconds(store.pid) - cpu_before
                # the load generator's warm-up requests also reach Redis
                warm = max(50, 2 * load)
                trips[target].append((_commands(redis_port) - before) / (run.requests + warm))
                results[(load, target)].append(run)
                print(f"round {index + 1}/{args.rounds} c={load:<2} {target:10} "
                      f"{run.rps:8.0f} req/s", file=sys.stderr)  # fmt: skip
    return results, trips


def _report(
    results: dict[Key, list[RunResult]], trips: dict[str, list[float]], args: argparse.Namespace
) -> None:
    print(f"\nmachine: {os.cpu_count()} cores, Python {platform.python_version()}; aiohttp "
          f"load generator; {args.rounds} rounds, {args.duration:g} s per c=32 run, "
          f"{args.requests} requests per c=1 run; medians over rounds\n")  # fmt: skip
    headers = ("target", "req/s c32", "vs off", "p50 ms c1", "p99 ms c1", "added p50 ms",
               "CPU ms/req c32", "vs off", "redis CPU ms/req", "redis cmds/req")  # fmt: skip
    base_rps = median([r.rps for r in results[(32, "off")]])
    base_cpu = median([r.cpu_ms_per_request("off") for r in results[(32, "off")]])
    base_p50 = median([percentile(r.latencies, 50) * 1000 for r in results[(1, "off")]])
    rows = []
    for target in TARGETS:
        rps = median([r.rps for r in results[(32, target)]])
        p50 = median([percentile(r.latencies, 50) * 1000 for r in results[(1, target)]])
        p99 = median([percentile(r.latencies, 99) * 1000 for r in results[(1, target)]])
        cpu = median([r.cpu_ms_per_request(target) for r in results[(32, target)]])
        store = median([r.cpu_ms_per_request("redis") for r in results[(32, target)]])
        rows.append([target, fmt(rps, 0), fmt(ratio(rps, base_rps), 2) + "x", fmt(p50),
                     fmt(p99), fmt(p50 - base_p50), fmt(cpu), fmt(ratio(cpu, base_cpu), 2) + "x",
                     fmt(store), fmt(median(trips[target]), 2)])  # fmt: skip
    print_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())
