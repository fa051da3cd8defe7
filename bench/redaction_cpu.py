"""CPU per request of prompt redaction on the event-loop side, in process (run by hand).

`python bench/redaction_cpu.py [--requests 3000] [--texts 400] [--rounds 3]`

Two cases, with the rules `full_pipeline.py` uses for "NER off" (every default rule but the
NER entity types), one worker process, medians over rounds:

1. hit: the same ~300-character prompt on every request (what `full_pipeline.py` and
   `ablate.py` send): `RedactPrompt.on_request` on a freshly parsed body, serializing the
   changed body as the upstream client would, and `on_response` on a parsed completion that
   echoes the placeholders. The redactor's cache answers, so this is all event-loop CPU.
2. miss: a new Faker prompt (fixed seed) per request through `Redactor.analyze`, end to end:
   CPU of this process plus CPU of the worker processes (from /proc), and wall time per call.
   With `in_process_chars` above 0 the pattern-only analysis of short texts runs in this
   process instead; both settings are measured in the same run, and so is how long one
   analysis at the cap holds the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from faker import Faker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pipeline import _entities_without_ner, request_body  # noqa: E402

from gateway.config import RedactionSettings  # noqa: E402
from gateway.exchange import Exchange  # noqa: E402
from gateway.log import configure_logging  # noqa: E402
from gateway.redaction_rules import RedactionRules  # noqa: E402
from gateway.redactor import Redactor  # noqa: E402
from gateway.stages.redact_prompt import RedactPrompt  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of this process's children (the redaction workers), from /proc."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def prompts(count: int, seed: int) -> list[str]:
    """Distinct prompts shaped like the benchmark's: a name, an e-mail, a phone, a city."""
    fake = Faker("en_US")
    fake.seed_instance(seed)
    return [
        f"Please write a short, polite reply to {fake.name()} ({fake.email()}, phone "
        f"{fake.phone_number()}) who asked about the delivery of order {fake.random_int()} "
        f"to {fake.city()}. Mention that the parcel left our warehouse yesterday and should "
        f"arrive within {fake.random_int(2, 9)} working days. {fake.sentence()}"
        for _ in range(count)
    ]


def exchange_for(raw: bytes) -> Exchange:
    body = orjson.loads(raw)
    return Exchange(
        request_id="r", endpoint="chat.completions", method="POST",
        path="/v1/chat/completions", headers={}, client_address="127.0.0.1",
        raw_body=raw, body=body, model=body.get("model"),
    )  # fmt: skip


def completion_for(exchange: Exchange) -> bytes:
    """An answer that mentions every placeholder the request was given."""
    text = "Dear customer, " + " and ".join(exchange.placeholders) + ". Your parcel is on its way."
    return orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 70, "completion_tokens": 30, "total_tokens": 100},
    })  # fmt: skip


async def hit_case(stage: RedactPrompt, raw: bytes, requests: int) -> float:
    """Microseconds of CPU per request, cache warm."""
    first = exchange_for(raw)
    await stage.on_request(first)
    completion = completion_for(first)
    started = time.process_time()
    for _ in range(requests):
        exchange = exchange_for(raw)
        await stage.on_request(exchange)
        orjson.dumps(exchange.body)
        await stage.on_response(exchange, orjson.loads(completion))
    return (time.process_time() - started) / requests * 1e6


async def miss_case(redactor: Redactor, texts: list[str], rules: RedactionRules) -> dict[str, Any]:
    """Per text: main-process and worker CPU, wall time (microseconds)."""
    own, workers, wall = time.process_time(), children_cpu(), time.perf_counter()
    for text in texts:
        await redactor.analyze([text], rules)
    n = len(texts)
    return {
        "main": (time.process_time() - own) / n * 1e6,
        "workers": (children_cpu() - workers) / n * 1e6,
        "wall": (time.perf_counter() - wall) / n * 1e6,
    }


async def longest_hold(redactor: Redactor, chars: int, count: int = 40) -> float:
    """Median milliseconds one in-process analysis of `chars` characters holds the loop."""
    held = []
    for seed in range(count):
        text = " ".join(prompts(chars // 200 + 1, seed=1000 + seed))[:chars]
        started = time.perf_counter()
        await redactor.analyze([text], redactor.rules)
        held.append(time.perf_counter() - started)
    return statistics.median(held) * 1000


def settings(in_process_chars: int) -> RedactionSettings:
    rules = RedactionRules.model_validate({"entities": _entities_without_ner()})
    fields: dict[str, Any] = {"enabled": True, "workers": 1, "rules": rules, "hash_key": "k"}
    if "in_process_chars" in RedactionSettings.model_fields:
        fields["in_process_chars"] = in_process_chars
    return RedactionSettings(**fields)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configure_logging("info")
    variants = {"workers only": 0}
    if "in_process_chars" in RedactionSettings.model_fields:
        variants["in process"] = RedactionSettings.model_fields["in_process_chars"].default
    engines = {}
    for name, chars in variants.items():
        engines[name] = Redactor(settings(chars))
        await engines[name].open()
    raw = request_body()
    hits: list[float] = []
    misses: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for round_number in range(args.rounds):
        hits.append(await hit_case(RedactPrompt(engines["workers only"]), raw, args.requests))
        for name, engine in engines.items():
            texts = prompts(args.texts, seed=round_number * 100 + len(misses[name]))
            misses[name].append(await miss_case(engine, texts, engine.rules))
    print(f"hit: {statistics.median(hits):.1f} us CPU per request (on_request + body "
          "serialization + on_response)")  # fmt: skip
    for name, runs in misses.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("main", "workers", "wall")}
        print(
            f"miss, {name}: main {med['main']:.0f} us + workers {med['workers']:.0f} us = "
            f"{med['main'] + med['workers']:.0f} us CPU per text; wall {med['wall']:.0f} us"
        )
    if "in process" in engines:
        chars = variants["in process"]
        held = await longest_hold(engines["in process"], chars)
        print(f"in process, a {chars}-character text (the cap): {held:.1f} ms on the event loop")
    for engine in engines.values():
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
