"""Policy benchmark (run by hand): `python bench/policies.py [--repeats 7] [--streams 60]`.

In one run, against baselines measured in the same run, alternating targets, repeated, medians:
1. Completion filtering cost (`PolicySet.evaluate`, direction completion) with 10, 100 and 1000
   rules (half regex, half word lists) on 1 KB and 16 KB texts, as time and this process's own
   CPU time per call (from /proc/self/stat), and the ratio to 10 rules. Target: 1000 < 5x 10.
2. Stream filtering cost per 4-character chunk (`StreamMatcher` over `PolicySet.scan`, which
   finds where a match could still be starting) with 10, 100 and 1000 rules, and the longest
   hold-back seen, on a 1 KB text.
3. Streaming time to first chunk through two real gateway processes in front of one demo
   provider (50 ms before its first byte, 2 ms between 4-character chunks, 150-word replies):
   policies on (the shipped directory) vs off, alternating, and each gateway's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REPO,
    cpu_seconds,
    fmt,
    free_port,
    gateway_command,
    median,
    print_table,
    ratio,
    start_server,
)
from gateway.policies import Finding, PolicySet, parse_policy  # noqa: E402
from gateway.stream_matcher import Scanned, StreamMatcher  # noqa: E402

RULE_COUNTS = (10, 100, 1000)
TEXT_SIZES = (1024, 16 * 1024)
_LOREM = (
    "the gateway forwards each request to the model provider and returns the answer while it "
    "keeps secrets and personal data away from places they should not go"
)
WORDS = tuple(_LOREM.split(" "))


def policy_text(count: int, seed: int = 11) -> str:
    """`count` rules that do not match the benchmark text: regexes and word lists, alternating."""
    rng = random.Random(seed)
    lines = ["id: bench", "version: 1", "rules:"]
    for index in range(count):
        token = "".join(rng.choices(string.ascii_lowercase, k=9))
        if index % 2:
            lines += [f"  - id: r{index}", "    kind: regex", "    direction: completion",
                      f"    pattern: '{token}[-_][0-9a-f]{{8,16}}'"]  # fmt: skip
        else:
            other = "".join(rng.choices(string.ascii_lowercase, k=7))
            lines += [f"  - id: r{index}", "    kind: words", "    direction: completion",
                      f"    words: ['{token}', '{other} {token}']"]  # fmt: skip
    return "\n".join(lines) + "\n"


def sample_text(size: int, seed: int = 3) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:size]


def build(count: int) -> PolicySet:
    policy, problems = parse_policy("bench.yaml", policy_text(count))
    assert policy is not None and not problems, problems
    return PolicySet((policy,), "bench")


async def filtering(repeats: int, calls: int) -> None:
    sets = {count: build(count) for count in RULE_COUNTS}
    texts = {size: sample_text(size) for size in TEXT_SIZES}
    wall: dict[tuple[int, int], list[float]] = {(c, s): [] for c in RULE_COUNTS for s in TEXT_SIZES}
    cpu: dict[tuple[int, int], list[float]] = {key: [] for key in wall}
    for _ in range(repeats):
        for size in TEXT_SIZES:
            for count in RULE_COUNTS:  # alternate targets within every round
                policies, text = sets[count], texts[size]
                selection = policies.select_all()
                await policies.evaluate(selection, text, "completion")  # warm
                cpu_start, start = cpu_seconds_self(), time.perf_counter()
                for _ in range(calls):
                    await policies.evaluate(selection, text, "completion")
                wall[(count, size)].append((time.perf_counter() - start) / calls)
                cpu[(count, size)].append(cpu_seconds_self() - cpu_start)
    rows = []
    for size in TEXT_SIZES:
        base = median(wall[(RULE_COUNTS[0], size)])
        for count in RULE_COUNTS:
            value = median(wall[(count, size)])
            spent = sum(cpu[(count, size)]) / (repeats * calls)  # ticks are 10 ms: use totals
            rows.append([f"{size // 1024} KB", str(count), fmt(value * 1e6, 1),
                         fmt(spent * 1e6, 1), fmt(ratio(value, base), 2)])  # fmt: skip
    print(f"\n## Completion filtering cost (median of {repeats} rounds x {calls} calls)\n")
    print_table(["text", "rules", "us/call", "CPU us/call", "x 10 rules"], rows)
    worst = max(ratio(median(wall[(1000, s)]), median(wall[(10, s)])) for s in TEXT_SIZES)
    verdict = "met" if worst < 5 else "NOT met"
    print(f"\nTarget 1000 rules < 5x 10 rules: {verdict} (worst ratio {worst:.2f})")


def completion_scan(policies: PolicySet) -> Callable[[str, int], Awaitable[Scanned[Finding]]]:
    selection = policies.select_all()

    async def scan(text: str, fresh: int) -> Scanned[Finding]:
        return await policies.scan(selection, text, "completion", fresh=fresh)

    return scan


async def stream_filtering(repeats: int) -> None:
    sets = {count: build(count) for count in RULE_COUNTS}
    chunks = [sample_text(1024)[i : i + 4] for i in range(0, 1024, 4)]
    wall: dict[int, list[float]] = {count: [] for count in RULE_COUNTS}
    held: dict[int, int] = dict.fromkeys(RULE_COUNTS, 0)
    for _ in range(repeats):
        for count in RULE_COUNTS:  # alternate targets within every round
            matcher = StreamMatcher(completion_scan(sets[count]))
            start = time.perf_counter()
            for chunk in chunks:
                await matcher.feed(chunk)
                held[count] = max(held[count], matcher.held)
            await matcher.finish()
            wall[count].append((time.perf_counter() - start) / len(chunks))
    base = median(wall[RULE_COUNTS[0]])
    rows = [[str(c), fmt(median(wall[c]) * 1e6, 1), str(held[c]),
             fmt(ratio(median(wall[c]), base), 2)] for c in RULE_COUNTS]  # fmt: skip
    print(f"\n## Stream filtering cost per 4-char chunk, 1 KB text (median of {repeats} rounds)\n")
    print_table(["rules", "us/chunk", "most chars held", "x 10 rules"], rows)


def cpu_seconds_self() -> float:
    return cpu_seconds(os.getpid())


def gateway_config(port: int, provider_url: str, policies: bool) -> dict[str, object]:
    return {
        "server": {"port": port},
        "providers": {"demo": {"base_url": provider_url, "retries": {"attempts": 0}}},
        "models": [{"name": "gpt-4o-mini", "provider": "demo"}],
        "auth": {"mode": "disabled"},
        "audit": {"enabled": False},
        "logging": {"level": "warning"},
        "policies": {"enabled": policies, "directory": str(REPO / "policies")},
    }


async def first_chunk(session: aiohttp.ClientSession, url: str, prompt: str) -> float:
    """Seconds until the first event carrying content text arrives."""
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    started = time.perf_counter()
    first = 0.0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, response.status
        async for line in response.content:
            if not first and _has_text(line):
                first = time.perf_counter() - started
    return first


def _has_text(line: bytes) -> bool:
    if not line.startswith(b"data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def streaming(streams: int, workdir: Path) -> None:
    provider_port = free_port()
    provider = start_server(
        "demo-provider",
        [*gateway_command(), "demo-provider", "--port", str(provider_port), "--latency-ms", "50",
         "--chunk-delay-ms", "2", "--chunk-chars", "4", "--mode", "lorem", "--reply-words", "150"],
        f"http://127.0.0.1:{provider_port}", ready_path="/v1/models", log_dir=workdir,
    )  # fmt: skip
    servers = {}
    try:
        for name, enabled in (("off", False), ("on", True)):
            port = free_port()
            path = workdir / f"gateway-{name}.yaml"
            path.write_text(yaml.safe_dump(gateway_config(port, provider.url + "/v1", enabled)))
            servers[name] = start_server(
                f"gateway-{name}", [*gateway_command(), "serve", "--config", str(path)],
                f"http://127.0.0.1:{port}", ready_path="/healthz", log_dir=workdir,
            )  # fmt: skip
        await _compare_streams(servers, streams)
    finally:
        for server in [*servers.values(), provider]:
            server.stop()


async def _compare_streams(servers: dict, streams: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in servers}
    prompt = " ".join(WORDS[:20])
    async with aiohttp.ClientSession() as session:
        for server in servers.values():
            for _ in range(5):
                await first_chunk(session, server.url, prompt)  # warm
        cpu_before = {name: s.cpu() for name, s in servers.items()}
        for index in range(streams):
            order = ("off", "on") if index % 2 else ("on", "off")
            for name in order:
                times[name].append(await first_chunk(session, servers[name].url, prompt))
        cpu = {n: (s.cpu() - cpu_before[n]) / streams for n, s in servers.items()}
    off = median(times["off"])
    rows = [[name, fmt(median(times[name]) * 1e3, 2), fmt((median(times[name]) - off) * 1e3, 2),
             fmt(cpu[name] * 1e3, 2)] for name in ("off", "on")]  # fmt: skip
    print(f"\n## Streaming time to first chunk (median of {streams} alternating streams)\n")
    print_table(["policies", "TTFC ms", "added ms", "gateway CPU ms/request"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=60)
    args = parser.parse_args()
    asyncio.run(filtering(args.repeats, args.calls))
    asyncio.run(stream_filtering(args.repeats))
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as workdir:
        asyncio.run(streaming(args.streams, Path(workdir)))


if __name__ == "__main__":
    main()
