"""The cost of the proxy itself: the gateway (empty pipeline) against a minimal aiohttp proxy.

Starts, as separate processes, the demo provider, the floor proxy (bench/floor_proxy.py) in
front of it and the gateway in front of it with every optional stage off. Then, in rounds and
alternating the targets (direct to the provider, floor, gateway), it measures for non-stream
and stream chat completions: requests/s at concurrency 32 and 64, latency at concurrency 1
(whole answer, or time to the first chunk for streams) and each proxy's own CPU time per
request from /proc/<pid>/stat. Prints medians over rounds and the gateway/floor ratios.

`python bench/proxy.py [--rounds 5] [--duration 3] [--requests 3000] [--stream-requests 300]`
Targets: gateway CPU per request <= 1.2x the floor's; added p50 at concurrency 1 < 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    REPO,
    RunResult,
    Server,
    fmt,
    free_port,
    gateway_command,
    has_wrk,
    median,
    percentile,
    print_table,
    ratio,
    run_python,
    run_wrk,
    start_server,
)
from pydantic import BaseModel

sys.path.insert(0, str(REPO))
from gateway.config import Settings  # noqa: E402

TARGETS = ("direct", "floor", "gateway")
MODES = ("non-stream", "stream")
LOADS = (1, 32, 64)
CHAT_PATH = "/v1/chat/completions"
CPU_TARGET = 1.2
LATENCY_TARGET_MS = 1.0

Key = tuple[str, int, str]  # mode, concurrency, target


def main() -> int:
    args = _parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        servers = _start(Path(tmp), args)
        try:
            stages = _active_stages(servers["gateway"])
            results = _measure(servers, args)
        finally:
            for server in reversed(list(servers.values())):
                server.stop()
    _report(results, args, stages)
    return 0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of all measurements")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load run")
    # /proc counts CPU in 10 ms ticks: 1000 requests at ~0.3 ms each read to +-3%, a ratio of
    # two such readings to +-6%; 3000 requests make it +-2%.
    parser.add_argument("--requests", type=int, default=3000, help="requests per c=1 run")
    parser.add_argument(
        "--stream-requests", type=int, default=300, help="streams per c=1 run (each takes ~12 ms)"
    )
    parser.add_argument("--content-chars", type=int, default=128, help="prompt length")
    parser.add_argument("--chunk-chars", type=int, default=16, help="demo chars per event")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=1.0,
        help="demo delay between stream events (real streams have gaps)",
    )  # fmt: skip
    parser.add_argument("--python-load", action="store_true", help="do not use wrk")
    return parser.parse_args()


# --- processes -----------------------------------------------------------------------------


def _start(tmp: Path, args: argparse.Namespace) -> dict[str, Server]:
    demo_port, floor_port, gateway_port = free_port(), free_port(), free_port()
    demo_url = f"http://127.0.0.1:{demo_port}"
    servers: dict[str, Server] = {}
    try:
        servers["demo"] = start_server(
            "demo", [*gateway_command(), "demo-provider", "--port", str(demo_port),
                     "--chunk-chars", str(args.chunk_chars),
                     "--chunk-delay-ms", str(args.chunk_delay_ms)],
            demo_url, ready_path="/v1/models", log_dir=tmp,
        )  # fmt: skip
        servers["floor"] = start_server(
            "floor", [sys.executable, str(REPO / "bench" / "floor_proxy.py"),
                      "--port", str(floor_port), "--upstream", demo_url],
            f"http://127.0.0.1:{floor_port}", ready_path="/v1/models", log_dir=tmp,
        )  # fmt: skip
        config = tmp / "gateway.yaml"
        config.write_text(json.dumps(gateway_config(demo_url, gateway_port)))
        servers["gateway"] = start_server(
            "gateway", [*gateway_command(), "serve", "--config", str(config)],
            f"http://127.0.0.1:{gateway_port}", ready_path="/healthz", log_dir=tmp,
        )  # fmt: skip
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def gateway_config(demo_url: str, port: int) -> dict[str, Any]:
    """A config with an empty pipeline: auth disabled and every section with `enabled` off."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "providers": {"demo": {"base_url": demo_url + "/v1", "api_key": "bench-provider-key",
                               "retries": {"attempts": 0}}},
        "models": [{"name": "gpt-4o-mini", "provider": "demo"}],
        "auth": {"mode": "disabled"},
    }  # fmt: skip
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            continue
        if "enabled" in section.model_fields and name not in config:
            config[name] = {"enabled": False}
    Settings.model_validate(config)
    return config


def _active_stages(gateway: Server) -> list[str]:
    """The stages that ran on one warm-up request, read from the gateway's own metrics."""
    request = urllib.request.Request(  # noqa: S310 - loopback
        gateway.url + CHAT_PATH, data=_body(False, 16), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        response.read()
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    found = re.findall(r'gateway_stage_seconds_count\{[^}]*stage="([^"]+)"', text)
    return sorted(set(found))


def _body(stream: bool, chars: int) -> bytes:
    content = ("benchmark the gateway " * (chars // 22 + 1))[:chars]
    body: dict[str, Any] = {"model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


# --- measuring -----------------------------------------------------------------------------


def _measure(servers: dict[str, Server], args: argparse.Namespace) -> dict[Key, list[RunResult]]:
    urls = {"direct": servers["demo"].url, "floor": servers["floor"].url,
            "gateway": servers["gateway"].url}  # fmt: skip
    watch = list(servers.values())
    results: dict[Key, list[RunResult]] = defaultdict(list)
    for round_index in range(args.rounds):
        order = TARGETS[round_index % 3 :] + TARGETS[: round_index % 3]
        for mode in MODES:
            body = _body(mode == "stream", args.content_chars)
            for load in LOADS:
                for target in order:
                    run = _run(urls[target] + CHAT_PATH, body, load, mode, watch, args)
                    if run.errors:
                        raise RuntimeError(f"{target} {mode} c={load}: {run.errors} errors")
                    results[(mode, load, target)].append(run)
                    print(f"round {round_index + 1}/{args.rounds} {mode:10} c={load:<2} "
                          f"{target:8} {run.rps:8.0f} req/s", file=sys.stderr)  # fmt: skip
    return results


def _run(
    url: str, body: bytes, load: int, mode: str, watch: list[Server], args: argparse.Namespace
) -> RunResult:
    stream = mode == "stream"
    if load == 1:
        count = args.stream_requests if stream else args.requests
        return run_python(url, body, concurrency=1, count=count, stream=stream, watch=watch)
    if has_wrk() and not args.python_load:
        run_wrk(url, body, concurrency=load, duration=1, watch=watch)  # warm-up, not counted
        return run_wrk(url, body, concurrency=load, duration=args.duration, watch=watch)
    return run_python(url, body, concurrency=load, duration=args.duration, stream=stream,
                      watch=watch)  # fmt: skip


# --- report --------------------------------------------------------------------------------


def _report(
    results: dict[Key, list[RunResult]], args: argparse.Namespace, stages: list[str]
) -> None:
    tool = results[(MODES[0], LOADS[-1], TARGETS[0])][0].tool
    print(f"\nmachine: {os.cpu_count()} cores, Python {platform.python_version()}, aiohttp "
          f"{aiohttp.__version__}; load: {tool} for c=32/64, aiohttp client for c=1; "
          f"{args.rounds} rounds, {args.duration:g} s per load run, {args.requests} requests "
          f"({args.stream_requests} streams) per c=1 run; medians over rounds")  # fmt: skip
    print(f"gateway stages active: {', '.join(stages) or 'none (empty pipeline)'}")
    print(
        f"request: chat completion, {args.content_chars}-char prompt echoed back; stream: "
        f"{args.chunk_chars} chars per event, {args.chunk_delay_ms:g} ms between events\n"
    )
    verdicts = []
    for mode in MODES:
        latency = "time to first chunk" if mode == "stream" else "whole answer"
        print(f"### {mode} (c=1 latency: {latency})\n")
        rows = [_row(results, mode, t) for t in TARGETS] + [_ratio_row(results, mode)]
        print_table(_HEADERS, rows)
        demo = [median([r.cpu_ms_per_request("demo") for r in results[(mode, load, "gateway")]])
                for load in LOADS]  # fmt: skip
        print(f"\ndemo provider CPU ms/req (c=1/32/64): {' / '.join(fmt(d) for d in demo)}\n")
        verdicts += _verdicts(results, mode)
    print("### targets\n")
    for line in verdicts:
        print(line)


_HEADERS = ("target", "req/s c32", "req/s c64", "p50 ms c1", "p99 ms c1", "added p50 ms",
            "added p99 ms", "CPU ms/req c1", "CPU ms/req c32", "CPU ms/req c64")  # fmt: skip


def _row(results: dict[Key, list[RunResult]], mode: str, target: str) -> list[str]:
    rps = [median([r.rps for r in results[(mode, load, target)]]) for load in LOADS[1:]]
    p50 = median([_pct(r, 50) for r in results[(mode, 1, target)]])
    p99 = median([_pct(r, 99) for r in results[(mode, 1, target)]])
    added = [_added(results, mode, target, q) for q in (50, 99)]
    cpu = [_cpu(results, mode, load, target) for load in LOADS]
    return [target, *(fmt(x, 0) for x in rps), fmt(p50), fmt(p99),
            *(fmt(a) if target != "direct" else "-" for a in added),
            *(fmt(c) for c in cpu)]  # fmt: skip


def _ratio_row(results: dict[Key, list[RunResult]], mode: str) -> list[str]:
    rps = [
        ratio(
            median([r.rps for r in results[(mode, load, "gateway")]]),
            median([r.rps for r in results[(mode, load, "floor")]]),
        )
        for load in LOADS[1:]
    ]
    cpu = [ratio(_cpu(results, mode, load, "gateway"), _cpu(results, mode, load, "floor"))
           for load in LOADS]  # fmt: skip
    return ["gateway/floor", *(fmt(x, 2) + "x" for x in rps), "", "", "", "",
            *(fmt(c, 2) + "x" for c in cpu)]  # fmt: skip


def _pct(run: RunResult, q: float) -> float:
    return 1000 * percentile(run.latencies, q)


def _added(results: dict[Key, list[RunResult]], mode: str, target: str, q: float) -> float:
    """Median over rounds of the target's percentile minus direct's in the same round."""
    pairs = zip(results[(mode, 1, target)], results[(mode, 1, "direct")], strict=True)
    return median([_pct(t, q) - _pct(d, q) for t, d in pairs])


def _cpu(results: dict[Key, list[RunResult]], mode: str, load: int, target: str) -> float:
    if target == "direct":
        return float("nan")
    return median([r.cpu_ms_per_request(target) for r in results[(mode, load, target)]])


def _verdicts(results: dict[Key, list[RunResult]], mode: str) -> list[str]:
    lines = []
    for load in LOADS:
        cpu = ratio(_cpu(results, mode, load, "gateway"), _cpu(results, mode, load, "floor"))
        verdict = "PASS" if cpu <= CPU_TARGET else "MISS"
        lines.append(f"{verdict}  {mode} c={load}: gateway CPU/request {cpu:.2f}x the floor's "
                     f"(target <= {CPU_TARGET}x)")  # fmt: skip
    added = _added(results, mode, "gateway", 50)
    verdict = "PASS" if added < LATENCY_TARGET_MS else "MISS"
    lines.append(f"{verdict}  {mode} c=1: gateway adds {added:.3f} ms p50 over direct "
                 f"(target < {LATENCY_TARGET_MS} ms)")  # fmt: skip
    return lines


if __name__ == "__main__":
    sys.exit(main())
