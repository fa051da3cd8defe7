"""Instructions per request under callgrind: the floor, the bare gateway and the full pipeline.

CPU time per request moves by 10-20 % between runs on a shared 2-core machine; instruction
counts do not. Each target runs under `valgrind --tool=callgrind --instr-atstart=no`; the
script warms it up, switches instrumentation on around a fixed number of requests (from the
Python load generator, which is not measured), dumps, and divides the `totals:` line by the
requests. The demo provider and Redis run natively.

Targets: `floor` (bench/floor_proxy.py), `bare` (every feature off, as in
bench/full_pipeline.py) and `full` (JWT, Redis limits, shipped policies, audit, redaction
with NER off), plus `full-without-<section>` for each of `audit`, `auth`, `limits`,
`policies`, `redaction`, `anomaly`: what one feature costs inside the full pipeline.

`python bench/instructions.py [--targets floor,bare,full] [--concurrency 1,32]
[--requests 1000] [--stream]`

About a minute per target (most of it the start-up under valgrind).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import REPO, Server, free_port, gateway_command, print_table, run_python, start_server
from full_pipeline import (
    Features,
    bare_config,
    full_config,
    request_body,
    start_provider,
    start_redis,
    token,
)

VALGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no"]
SECTIONS = ("audit", "auth", "limits", "policies", "redaction", "anomaly")


def target_argv(name: str, provider: str, redis_url: str, secret: str, tmp: Path) -> list[str]:
    """The command that serves `name` on a free port (appended as `--port P` by the caller)."""
    if name == "floor":
        return [sys.executable, str(REPO / "bench" / "floor_proxy.py"), "--upstream", provider]
    config = (
        bare_config(provider)
        if name == "bare"
        else full_config(provider, redis_url, secret, False, Features())
    )
    if name.startswith("full-without-"):
        config.update(_without(config, name.removeprefix("full-without-")))
    if "redis" in config:
        # Under valgrind the gateway runs ~50x slower, so a busy machine can hold a batch past
        # the 0.25 s command timeout and fail requests; waiting longer costs no instructions.
        config["redis"] = {**config["redis"], "timeout": 10.0, "connect_timeout": 5.0}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return [*gateway_command(), "serve", "--config", str(path)]


def _without(config: dict[str, Any], section: str) -> dict[str, Any]:
    """The sections to replace in `config` to switch `section` off."""
    if section == "auth":
        return {"auth": {"mode": "disabled"}}
    if section == "anomaly":
        return {"audit": {**config["audit"], "anomaly": {"enabled": False}}}
    return {section: {"enabled": False}}


def start_under_callgrind(name: str, argv: list[str], tmp: Path) -> tuple[Server, Path]:
    port = free_port()
    out = tmp / f"callgrind.{name}"
    command = [*VALGRIND, f"--callgrind-out-file={out}.%p", *argv, "--port", str(port)]
    ready = "/v1/models" if name == "floor" else "/healthz"
    server = start_server(name, command, f"http://127.0.0.1:{port}", log_dir=tmp,
                          ready_path=ready, timeout=300.0)  # fmt: skip
    return server, out


def count(server: Server, out: Path, body: bytes, headers: dict[str, str], *,
          concurrency: int, requests: int, stream: bool) -> float:  # fmt: skip
    """Instructions per request over `requests` requests at `concurrency` in flight."""
    url = server.url + "/v1/chat/completions"
    run_python(url, body, concurrency=concurrency, watch=[], count=max(100, requests // 4),
               headers=headers, stream=stream)  # fmt: skip
    _control(server.pid, "--zero")
    _control(server.pid, "--instr=on")
    result = run_python(url, body, concurrency=concurrency, watch=[], count=requests,
                        headers=headers, stream=stream)  # fmt: skip
    before = set(out.parent.glob(f"{out.name}.{server.pid}*"))
    # Dump before switching off: a dump taken with instrumentation off reads zero.
    _control(server.pid, "--dump")
    _control(server.pid, "--instr=off")
    if result.errors:
        raise RuntimeError(f"{server.name}: {result.errors} requests failed")
    return _totals(_new_dump(out, server.pid, before)) / result.requests


def _control(pid: int, option: str) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def _new_dump(out: Path, pid: int, before: set[Path]) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fresh = set(out.parent.glob(f"{out.name}.{pid}*")) - before
        if fresh:
            time.sleep(0.5)  # let callgrind finish writing it
            return max(fresh, key=lambda p: p.stat().st_mtime)
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def _totals(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals line in {dump}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", default="floor,bare,full")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--stream", action="store_true",
                        help="streamed requests: 16-character events 1 ms apart")  # fmt: skip
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    names = args.targets.split(",")
    unknown = [n for n in names if n not in ("floor", "bare", "full")
               and n.removeprefix("full-without-") not in SECTIONS]  # fmt: skip
    if unknown:
        sys.exit(f"unknown targets: {', '.join(unknown)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    secret = secrets.token_urlsafe(48)
    headers = {"Authorization": f"Bearer {token(secret)}"}
    body = request_body(stream=args.stream)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as tmp_name:
        tmp = Path(tmp_name)
        started: list[Any] = []
        try:
            redis, redis_url = start_redis(tmp)
            started.append(redis)
            provider = start_provider(tmp, stream=args.stream)
            started.append(provider)
            for name in names:
                argv = target_argv(name, provider.url, redis_url, secret, tmp)
                server, out = start_under_callgrind(name, argv, tmp)
                try:
                    results[name] = [
                        count(server, out, body, headers, concurrency=c,
                              requests=args.requests, stream=args.stream)
                        for c in levels
                    ]  # fmt: skip
                finally:
                    server.stop()
                counted = zip(levels, results[name], strict=True)
                print(f"{name}: " + ", ".join(f"c{c} {v / 1000:.0f}k" for c, v in counted),
                      flush=True)  # fmt: skip
        finally:
            for process in started:
                process.stop() if isinstance(process, Server) else process.terminate()
    _report(results, levels, args)


def _report(results: dict[str, list[float]], levels: list[int], args: argparse.Namespace) -> None:
    kind = "streamed" if args.stream else "non-stream"
    print(f"\nThousands of instructions per request ({kind}, {args.requests} requests each)\n")
    floor = results.get("floor")
    rows = []
    for name, values in results.items():
        row = [name] + [f"{v / 1000:.0f}k" for v in values]
        if floor:
            row += [f"{v / f:.2f}x" for v, f in zip(values, floor, strict=True)]
        rows.append(row)
    headers = ["target"] + [f"c{c}" for c in levels]
    if floor:
        headers += [f"c{c} x floor" for c in levels]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
