"""The full pipeline against the pass-through floor, at 1 and 2 worker processes.

Targets, measured in alternating rounds in one run: the demo provider itself (for added
latency), the floor proxy (bench/floor_proxy.py) with 1 and 2 processes on one port, and
`gateway serve` with JWT authentication, Redis rate limits, the shipped policies, audit
logging and prompt redaction, with NER off and on, at `--workers 1` and `--workers 2`. Each
round has a latency run (one request in flight) and a throughput run (`--concurrency` in
flight). CPU per request is the CPU time of the
target's whole process tree (master, workers, NER processes) read from /proc. "Cores busy"
is the whole machine's CPU use during the throughput run (load generator, provider, Redis and
the target together): near the core count, the machine, not the gateway, is the limit.
"CPU x floor" compares every target with the 1-process floor; "same processes" compares a
2-worker gateway with the 2-process floor, which pays the same for splitting the load over
two event loops.

The config adapts to the option names the checkout has: a feature whose section is missing is
left out and listed as such.

`--per-feature` starts instead the bare gateway plus each feature on its own, then all of them
(NER off, 1 worker), and adds each one's CPU over the bare gateway: what each feature costs.

`--stream` sends the same requests streamed: the provider answers in 16-character events 1 ms
apart (as `bench/proxy.py`), every event passes the stages that read streams, and latency is
the time to the first chunk.

`python bench/full_pipeline.py [--rounds 3] [--duration 5] [--concurrency 32] [--quick]
[--per-feature] [--stream]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import yaml
from common import (
    REPO,
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
from faker import Faker

from gateway.config import LimitSettings, PolicySettings, RedactionSettings, Settings
from gateway.config_auth import AuthSettings

ISSUER = "https://bench-issuer.invalid"
AUDIENCE = "llm-gateway"


@dataclass
class TreeServer:
    """A started server whose CPU is summed over its whole process tree."""

    server: Server

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def url(self) -> str:
        return self.server.url

    def cpu(self) -> float:
        return sum(_cpu_or_zero(pid) for pid in descendants(self.server.pid))

    def stop(self) -> None:
        """Stops the master; any worker or NER process left behind is killed, not orphaned."""
        tree = descendants(self.server.pid)
        self.server.stop()
        for pid in tree[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, queue = [root], [root]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


# --- configuration -------------------------------------------------------------------------


@dataclass
class Features:
    included: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


STREAM_PACING = ["--chunk-chars", "16", "--chunk-delay-ms", "1"]


def full_config(provider: str, redis_url: str, secret: str, ner: bool, features: Features) -> dict:
    config: dict[str, Any] = {
        "providers": {"demo": {"kind": "openai", "base_url": provider + "/v1",
                               "api_key": "bench-provider-key", "retries": {"attempts": 0}}},
        "models": [{"name": "gpt-4o-mini", "provider": "demo"}],
        "redis": {"url": redis_url},
        "audit": {"enabled": True},
        "logging": {"level": "info"},
    }  # fmt: skip
    features.included.append("audit log")
    issuer = {"issuer": ISSUER, "audience": [AUDIENCE], "algorithms": ["HS256"], "secret": secret}
    _add(config, features, "jwt auth", "issuers" in AuthSettings.model_fields,
         "auth", {"mode": "required", "issuers": [issuer]})  # fmt: skip
    tier = {"requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000,
            "concurrent": 10_000}  # fmt: skip
    _add(config, features, "redis rate limits", "tiers" in LimitSettings.model_fields, "limits",
         {"enabled": True, "backend": "redis", "tiers": {"bench": tier},
          "assignment": {"default_tier": "bench"}})  # fmt: skip
    _add(config, features, "shipped policies", "enabled" in PolicySettings.model_fields,
         "policies", {"enabled": True, "directory": str(REPO / "policies")})  # fmt: skip
    redaction: dict[str, Any] = {"enabled": True, "workers": 1}
    if not ner:
        redaction["rules"] = {"entities": _entities_without_ner()}
    _add(config, features, f"redaction (NER {'on' if ner else 'off'})",
         "rules" in RedactionSettings.model_fields, "redaction", redaction)  # fmt: skip
    Settings.model_validate(config)
    return config


Variant = tuple[str, dict[str, Any], int]  # label, config, workers


def full_configs(provider: str, redis_url: str, secret: str, features: Features) -> list[Variant]:
    """Every feature on, NER off and on, at 1 and 2 workers."""
    variants = []
    for ner in (False, True):
        # Both variants have the same features but the NER switch; list them once.
        noted = features if not ner else Features()
        config = full_config(provider, redis_url, secret, ner, noted)
        if ner and "redaction (NER off)" in features.included:
            features.included.append("redaction (NER on)")
        for workers in (1, 2):
            label = f"full, NER {'on' if ner else 'off'}, {workers} worker"
            variants.append((label + ("s" if workers > 1 else ""), config, workers))
    return variants


FEATURE_SECTIONS = {
    "audit log": ("audit",),
    "jwt auth": ("auth",),
    "redis rate limits": ("limits", "redis"),
    "shipped policies": ("policies",),
    "redaction (NER off)": ("redaction",),
}


def per_feature_configs(
    provider: str, redis_url: str, secret: str, features: Features
) -> list[Variant]:
    """`--per-feature`: the bare gateway plus one feature at a time, then all of them (NER
    off), one worker each: what each feature costs on its own."""
    full = full_config(provider, redis_url, secret, False, features)
    variants = []
    for label, sections in FEATURE_SECTIONS.items():
        if label in features.included:
            config = bare_config(provider)
            config.update({key: full[key] for key in sections})
            variants.append((f"only {label}", config, 1))
    variants.append(("full, NER off, 1 worker", full, 1))
    return variants


def bare_config(provider: str) -> dict[str, Any]:
    """The gateway with every feature off: its core (routing, metrics, upstream client)."""
    config = {
        "providers": {"demo": {"kind": "openai", "base_url": provider + "/v1",
                               "api_key": "bench-provider-key", "retries": {"attempts": 0}}},
        "models": [{"name": "gpt-4o-mini", "provider": "demo"}],
        "auth": {"mode": "disabled"},
        "audit": {"enabled": False},
    }  # fmt: skip
    Settings.model_validate(config)
    return config


def _add(config: dict, features: Features, label: str, present: bool, key: str,
         value: dict) -> None:  # fmt: skip
    """Adds a section when this checkout has its options; notes what was left out."""
    if present:
        config[key] = value
        features.included.append(label)
    else:
        features.missing.append(label)


def _entities_without_ner() -> dict[str, Any]:
    from gateway.redaction_rules import NER_ENTITIES, default_entities

    return {name: rule.model_dump(mode="json", exclude_none=True)
            for name, rule in default_entities().items() if name not in NER_ENTITIES}  # fmt: skip


# --- requests ------------------------------------------------------------------------------


def request_body(stream: bool = False) -> bytes:
    fake = Faker("en_US")
    Faker.seed(20240601)
    prompt = (
        f"Please write a short, polite reply to {fake.name()} ({fake.email()}, phone "
        f"{fake.phone_number()}) who asked about the delivery of order {fake.random_int()} "
        f"to {fake.city()}. Mention that the parcel left our warehouse yesterday and should "
        "arrive within three working days. Keep it under eighty words."
    )
    body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 64,
                            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def token(secret: str) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench-user", "tid": "bench",
              "exp": int(time.time()) + 6 * 3600}  # fmt: skip
    return jwt.encode(claims, secret, algorithm="HS256")


def run_load(url: str, body: bytes, headers: dict[str, str], *, concurrency: int,
             watch: list[Any], count: int = 0, duration: float = 0.0,
             stream: bool = False) -> RunResult:  # fmt: skip
    """bench/common.py's load generator in its own process, with our Authorization header."""
    return run_python(url, body, concurrency=concurrency, watch=watch, count=count,
                      duration=duration, headers=headers, stream=stream)  # fmt: skip


# --- the run -------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    server: Any
    path: str = "/v1/chat/completions"
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    cores_busy: list[float] = field(default_factory=list)
    errors: int = 0


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free port that keeps nothing on disk, and its URL."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"redis://127.0.0.1:{port}/0"


def start_provider(tmp: Path, *, stream: bool) -> Server:
    """`gateway demo-provider` on a free port; streams paced as `bench/proxy.py`'s."""
    port = free_port()
    return start_server(
        "provider", [*gateway_command(), "demo-provider", "--port", str(port),
                     *(STREAM_PACING if stream else [])],
        f"http://127.0.0.1:{port}", ready_path="/v1/models", log_dir=tmp,
    )  # fmt: skip


def start_gateway(name: str, config: dict[str, Any], workers: int, tmp: Path) -> TreeServer:
    port = free_port()
    config = {**config, "server": {"host": "127.0.0.1", "port": port, "workers": workers}}
    path = tmp / f"{name.replace(' ', '_')}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [*gateway_command(), "serve", "--config", str(path)]
    # NER workers load spaCy models: on a busy machine that takes longer than 20 s.
    server = start_server(name, argv, f"http://127.0.0.1:{port}", ready_path="/readyz",
                          log_dir=tmp, timeout=120.0)  # fmt: skip
    time.sleep(1.0 if workers == 1 else 3.0)  # let every worker finish starting
    return TreeServer(server)


def start_floor(provider: str, processes: int, tmp: Path) -> TreeServer:
    """bench/floor_proxy.py with `processes` processes on one port (the baseline for as many
    gateway workers)."""
    port = free_port()
    name = "floor proxy" + (f", {processes} processes" if processes > 1 else "")
    argv = [sys.executable, str(Path(__file__).parent / "floor_proxy.py"), "--port", str(port),
            "--upstream", provider, "--processes", str(processes)]  # fmt: skip
    server = start_server(name, argv, f"http://127.0.0.1:{port}", ready_path="/v1/models",
                          log_dir=tmp)  # fmt: skip
    time.sleep(1.0 if processes == 1 else 2.0)  # let every process finish starting
    return TreeServer(server)


def measure(target: Target, body: bytes, headers: dict[str, str], args: argparse.Namespace) -> None:
    url = target.server.url + target.path
    latency = run_load(url, body, headers, concurrency=1, watch=[], count=args.latency_count,
                       stream=args.stream)  # fmt: skip
    before = machine_jiffies()
    load = run_load(url, body, headers, concurrency=args.concurrency, watch=[target.server],
                    duration=args.duration, stream=args.stream)  # fmt: skip
    target.cores_busy.append(cores_busy(before, machine_jiffies()))
    target.p50.append(1000 * percentile(latency.latencies, 50))
    target.p99.append(1000 * percentile(latency.latencies, 99))
    target.rps.append(load.rps)
    if target.name != "provider (direct)":
        target.cpu_ms.append(load.cpu_ms_per_request(target.server.name))
    target.errors += latency.errors + load.errors


def machine_jiffies() -> tuple[int, int]:
    """(busy, all) CPU time of the whole machine so far, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    return sum(values) - idle, sum(values)


def cores_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How many of the machine's cores were busy on average (load generator, provider, Redis
    and the target together): near the core count, the machine is the limit."""
    spent = after[1] - before[1]
    return (after[0] - before[0]) / spent * (os.cpu_count() or 1) if spent else float("nan")


def report(targets: list[Target], features: Features, args: argparse.Namespace) -> None:
    by_name = {t.name: t for t in targets}
    direct, floor = by_name["provider (direct)"], by_name["floor proxy"]
    bare = by_name["gateway, all off, 1 worker"]
    floor_cpu, bare_cpu = median(floor.cpu_ms), median(bare.cpu_ms)
    floor_two = by_name.get("floor proxy, 2 processes")
    print(f"\nIncluded: {', '.join(features.included)}")
    if features.missing:
        print(f"Not in this checkout (left out): {', '.join(features.missing)}")
    kind = "streamed (latency: first chunk)" if args.stream else "non-stream"
    print(f"{args.rounds} rounds, medians; {kind}; latency at 1 in flight "
          f"({args.latency_count} requests), throughput at {args.concurrency} in flight for "
          f"{args.duration:g} s\n")  # fmt: skip
    rows = []
    floors = (floor, floor_two)
    for t in targets:
        added50 = median(t.p50) - median(direct.p50)
        added99 = median(t.p99) - median(direct.p99)
        cpu = median(t.cpu_ms)
        over_bare = fmt(cpu - bare_cpu, 3) if t.cpu_ms and t not in floors else "-"
        # A 2-worker gateway against the 2-process floor: the same number of event loops
        # sharing the same cores, so per-loop costs (fewer events per wake-up) cancel out.
        peer = floor_two if floor_two and t.name.endswith("2 workers") else floor
        same = fmt(ratio(cpu, median(peer.cpu_ms)), 2) if t.cpu_ms else "-"
        rows.append([t.name, fmt(median(t.rps), 0), fmt(median(t.p50), 2), fmt(added50, 2),
                     fmt(added99, 2), fmt(cpu, 3), fmt(ratio(cpu, floor_cpu), 2), same,
                     over_bare, fmt(median(t.cores_busy), 2), str(t.errors)])  # fmt: skip
    print_table(["target", "req/s", "p50 ms", "added p50 ms", "added p99 ms", "CPU ms/req",
                 "CPU x floor", "CPU x floor (same processes)", "CPU ms over all off",
                 f"cores busy (of {os.cpu_count()})", "errors"], rows)  # fmt: skip
    for ner in ("off", "on"):
        one, two = (
            by_name.get(f"full, NER {ner}, 1 worker"),
            by_name.get(f"full, NER {ner}, 2 workers"),
        )
        if one and two:
            print(f"NER {ner}: 2 workers / 1 worker throughput = "
                  f"{fmt(ratio(median(two.rps), median(one.rps)), 2)}x")  # fmt: skip
    if floor_two:
        print(f"floor: 2 processes / 1 process throughput = "
              f"{fmt(ratio(median(floor_two.rps), median(floor.rps)), 2)}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-count", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s, 100 latency requests")
    parser.add_argument(
        "--per-feature", action="store_true",
        help="each feature alone on the bare gateway, then all of them (NER off)",
    )  # fmt: skip
    parser.add_argument(
        "--stream", action="store_true",
        help="streamed requests: 16-character events 1 ms apart; latency to the first chunk",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.latency_count = 1, 2.0, 100
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed")
    secret = secrets.token_urlsafe(48)
    headers = {"Authorization": f"Bearer {token(secret)}"}
    body = request_body(stream=args.stream)
    features = Features()
    started: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="bench-full-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            redis, redis_url = start_redis(tmp)
            provider = start_provider(tmp, stream=args.stream)
            started.append(provider)
            targets = [Target("provider (direct)", provider)]
            for processes in (1,) if args.per_feature else (1, 2):
                started.append(start_floor(provider.url, processes, tmp))
                targets.append(Target(started[-1].name, started[-1]))
            bare = bare_config(provider.url)
            started.append(start_gateway("gateway, all off, 1 worker", bare, 1, tmp))
            targets.append(Target("gateway, all off, 1 worker", started[-1]))
            variants = (
                per_feature_configs(provider.url, redis_url, secret, features)
                if args.per_feature
                else full_configs(provider.url, redis_url, secret, features)
            )
            for label, config, workers in variants:
                gateway = start_gateway(label, config, workers, tmp)
                started.append(gateway)
                targets.append(Target(label, gateway))
            for round_number in range(args.rounds):
                print(f"round {round_number + 1}/{args.rounds}", file=sys.stderr)
                for target in targets:
                    measure(target, body, headers, args)
            report(targets, features, args)
        finally:
            for server in reversed(started):
                server.stop()
            if "redis" in locals():
                redis.kill()
                redis.wait()


if __name__ == "__main__":
    main()
