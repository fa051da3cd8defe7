"""In-process CPU cost of `EnforcePolicy` on the full pipeline's request (no server, no I/O).

Loads the shipped policies the way the app does (`PolicyStore` over `policies/`), then times
`on_request` and `on_response` on an exchange like `full_pipeline.py`'s, with the demo
provider's echo reply. Logging is the gateway's JSON at info, written to /dev/null.

`python bench/policy_enforcement.py [--number 2000] [--profile] [--policies DIR]`
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from full_pipeline import request_body

from gateway.config import PolicySettings
from gateway.demo_wire import chat_completion
from gateway.exchange import Exchange
from gateway.log import configure_logging
from gateway.policy_store import PolicyStore
from gateway.stages.enforce_policy import EnforcePolicy

REPO = Path(__file__).resolve().parent.parent


async def make_stage(directory: Path = REPO / "policies") -> EnforcePolicy:
    settings = PolicySettings(enabled=True, directory=directory, reload=False)
    store = PolicyStore(settings)
    await store.open()
    return EnforcePolicy(store, settings)


def make_exchange(raw: bytes) -> Exchange:
    body = json.loads(raw)
    exchange = Exchange("req_1", "chat.completions", "POST", "/v1/chat/completions", {}, "",
                        raw_body=raw, body=body)  # fmt: skip
    exchange.model = body["model"]
    return exchange


async def one(stage: EnforcePolicy, raw: bytes) -> None:
    exchange = make_exchange(raw)
    await stage.on_request(exchange)
    text = exchange.body["messages"][-1]["content"]
    exchange.status = 200
    await stage.on_response(exchange, chat_completion(exchange.body, text, None))


async def overhead(raw: bytes) -> None:
    """What `one` costs without the stage: building the exchange and the echo reply."""
    exchange = make_exchange(raw)
    text = exchange.body["messages"][-1]["content"]
    chat_completion(exchange.body, text, None)


async def timed(number: int, call: Any, *args: Any) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(number):
            await call(*args)
        best = min(best, (time.process_time() - start) / number)
    return best * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--policies", type=Path, default=REPO / "policies")
    args = parser.parse_args()
    configure_logging("info", "json", stream=open(os.devnull, "w"))  # noqa: ASYNC230, SIM115
    stage, raw = await make_stage(args.policies), request_body()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.number):
            await one(stage, raw)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    base = await timed(args.number, overhead, raw)
    total = await timed(args.number, one, stage, raw)
    print(f"EnforcePolicy on_request + on_response: {total - base:6.1f} us CPU per request")


if __name__ == "__main__":
    asyncio.run(main())
