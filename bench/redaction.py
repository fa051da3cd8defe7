"""Redaction benchmark (run by hand): `python bench/redaction.py [--seconds 8] [--repeats 15]
[--sections 123]`.

In one run, against baselines measured in the same run, alternating targets, repeated, medians:
1. The gateway's redaction time (`Redactor.analyze`, worker processes included) for 200 B, 1 KB
   and 8 KB prompts vs Presidio's `AnalyzerEngine().analyze` with its defaults on the same texts
   and spaCy model, with the recall of the seeded values for both.
2. A 20-turn conversation (history cached from the previous turn) vs its last message alone.
3. Requests/s at concurrency 32 through a real gateway with redaction on vs off, and the
   gateway's CPU time per request (its own process plus its redaction workers, from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import RedactionSettings  # noqa: E402
from gateway.redactor import Redactor  # noqa: E402
from tests.fakes.pii_samples import Sample, prompt_of_size  # noqa: E402

SIZES = (200, 1024, 8192)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def presidio_default(model: str):
    """Presidio as documented: all default recognizers, full spaCy pipeline, same model."""
    import tldextract.tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    # Keep the baseline offline too (its e-mail check would fetch the suffix list).
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())
    config = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]}
    return AnalyzerEngine(nlp_engine=NlpEngineProvider(nlp_configuration=config).create_engine())


def covered(text: str, used: list[Sample], spans: list[tuple[int, int]]) -> tuple[int, int]:
    hits = 0
    for sample in used:
        start = text.index(sample.value)
        wanted = [i for i in range(start, start + len(sample.value)) if not text[i].isspace()]
        got = sum(1 for i in wanted if any(a <= i < b for a, b in spans))
        hits += got / len(wanted) >= 0.9
    return hits, len(used)


def worker_cpu_seconds() -> float:
    """CPU time of this process's children (the redaction workers), all threads, from /proc."""
    total = 0
    for pid in children(os.getpid()):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except OSError:
                continue
    return total / 1e9


Timed = tuple[list[tuple[int, int]], float, float]
"""Spans found, wall seconds, CPU seconds."""


async def time_gateway(redactor: Redactor, text: str) -> Timed:
    cpu = time.process_time() + worker_cpu_seconds()
    started = time.perf_counter()
    (found,) = await redactor.analyze([text], redactor.rules)
    wall = time.perf_counter() - started
    cpu = time.process_time() + worker_cpu_seconds() - cpu
    return [(f.start, f.end) for f in found], wall, cpu


def time_presidio(baseline, text: str) -> Timed:
    cpu = time.process_time()
    started = time.perf_counter()
    results = baseline.analyze(text, language="en")
    wall = time.perf_counter() - started
    return [(r.start, r.end) for r in results], wall, time.process_time() - cpu


async def bench_sizes(redactor: Redactor, baseline, repeats: int) -> None:
    print("\n1. redaction time per prompt (median ms; distinct texts, no cache hits); CPU ms per")
    print("   request: gateway = its process + its workers, presidio = its process")
    print(f"{'size':>6} {'gateway':>9} {'presidio':>9} {'speedup':>8} {'cpu gw':>7} "
          f"{'cpu pres':>9} {'recall gw':>10} {'recall presidio':>16}")  # fmt: skip
    for size in SIZES:
        ours: list[Timed] = []
        theirs: list[Timed] = []
        recall_ours, recall_theirs = [0, 0], [0, 0]
        for trial in range(repeats):
            text, used = prompt_of_size(size, seed=size * 1000 + trial)
            if trial % 2:  # alternate which target goes first
                theirs.append(time_presidio(baseline, text))
                ours.append(await time_gateway(redactor, text))
            else:
                ours.append(await time_gateway(redactor, text))
                theirs.append(time_presidio(baseline, text))
            for tally, timed in ((recall_ours, ours[-1]), (recall_theirs, theirs[-1])):
                hits, total = covered(text, used, timed[0])
                tally[0] += hits
                tally[1] += total
        a, b = (statistics.median(t[1] for t in runs) * 1000 for runs in (ours, theirs))
        ca, cb = (statistics.median(t[2] for t in runs) * 1000 for runs in (ours, theirs))
        print(f"{size:6d} {a:9.1f} {b:9.1f} {b / a:7.2f}x {ca:7.1f} {cb:9.1f} "
              f"{recall_ours[0] / recall_ours[1]:10.3f} "
              f"{recall_theirs[0] / recall_theirs[1]:16.3f}")  # fmt: skip


async def bench_conversation(redactor: Redactor, repeats: int) -> None:
    full, last_only = [], []
    for trial in range(repeats):
        turns = [prompt_of_size(400, seed=90000 + trial * 100 + i)[0] for i in range(21)]
        await redactor.analyze(turns[:19], redactor.rules)  # the previous turn's request
        started = time.perf_counter()
        await redactor.analyze(turns[:20], redactor.rules)
        full.append(time.perf_counter() - started)
        started = time.perf_counter()
        await redactor.analyze([turns[20]], redactor.rules)
        last_only.append(time.perf_counter() - started)
    a, b = statistics.median(full) * 1000, statistics.median(last_only) * 1000
    print("\n2. 20-turn conversation (19 turns cached) vs its last message alone (median ms)")
    print(f"   20 turns {a:.1f} ms, last message {b:.1f} ms, ratio {a / b:.2f}x (target <= 1.5x)")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and of its live child processes (the redaction workers)."""
    total = 0.0
    for proc in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def start_provider(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "gateway", "demo-provider", "--port", str(port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


def start_gateway(
    provider_url: str, redaction: bool, workdir: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = {
        "server": {"port": port},
        "providers": {"demo": {"base_url": provider_url, "retries": {"attempts": 0}}},
        "models": [{"name": "gpt-4o-mini", "provider": "demo"}],
        "auth": {"mode": "disabled"},
        "logging": {"level": "warning"},
        "redaction": {"enabled": redaction},
    }
    path = workdir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                               stdout=subprocess.DEVNULL)  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


async def load(url: str, seconds: float, offset: int) -> int:
    """Requests completed in `seconds` by 32 concurrent clients, each prompt distinct."""
    done = 0
    deadline = time.perf_counter() + seconds
    prompts = [prompt_of_size(300, seed=offset + i)[0] for i in range(64)]

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            body = {
                "model": "gpt-4o-mini",
                "messages": [
                    {
                        "role": "user",
                        "content": f"{prompts[(index + n) % 64]} (request {index}-{n})",
                    }
                ],
            }
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                await response.read()
                assert response.status == 200, response.status
            done += 1

    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(i, session) for i in range(32)))
    return done


async def bench_throughput(seconds: float) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-redaction-"))
    provider_port = free_port()
    provider = start_provider(provider_port)
    provider_url = f"http://127.0.0.1:{provider_port}/v1"
    gateways = {name: start_gateway(provider_url, name == "on", workdir) for name in ("off", "on")}
    try:
        for _, url in gateways.values():
            await wait_ready(url + "/readyz")
        rates: dict[str, list[float]] = {"off": [], "on": []}
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        for round_ in range(3):
            for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                process, url = gateways[name]
                before = cpu_seconds(process.pid)
                count = await load(url, seconds, offset=round_ * 1000)
                cpu[name].append((cpu_seconds(process.pid) - before) / count)
                rates[name].append(count / seconds)
        print("\n3. concurrency 32, distinct ~300 B prompts with personal data (median of 3)")
        for name in ("off", "on"):
            print(f"   redaction {name:3}: {statistics.median(rates[name]):7.1f} req/s, "
                  f"gateway CPU {statistics.median(cpu[name]) * 1000:6.2f} ms/request "
                  f"(process + workers)")  # fmt: skip
    finally:
        for process, _ in gateways.values():
            process.terminate()
            process.wait(30)
        provider.terminate()
        provider.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sections", default="123", help="which sections to run, e.g. 1 or 13")
    args = parser.parse_args()
    settings = RedactionSettings(enabled=True, timeout=60)
    redactor = Redactor(settings)
    await redactor.open()
    print(f"model {settings.spacy_model}, {redactor.workers} redaction workers, "
          f"{len(os.sched_getaffinity(0))} cores")  # fmt: skip
    try:
        baseline = presidio_default(settings.spacy_model)
        baseline.analyze("warm up for Jane Doe in Paris", language="en")
        if "1" in args.sections:
            await bench_sizes(redactor, baseline, args.repeats)
        if "2" in args.sections:
            await bench_conversation(redactor, args.repeats)
    finally:
        await redactor.close()
    if "3" in args.sections:
        await bench_throughput(args.seconds)


if __name__ == "__main__":
    asyncio.run(main())
