"""The request path's `observer` and `incrementer` against prometheus_client's public API.

They write to prometheus_client's value objects directly; if a release of the library changes
how a histogram keeps its buckets, these tests fail instead of the metrics going wrong.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway import metrics

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)


def amounts() -> list[float]:
    """Values in every bucket, on every bound, and beyond the last: fixed seed."""
    generator = random.Random(20261129)
    drawn = [10 ** generator.uniform(-6, 1) for _ in range(2000)]
    return [*drawn, *BUCKETS, 0.0, 5.0, 1e9]


def exposition(registry: CollectorRegistry) -> list[str]:
    """The exposition without `_created` lines, which hold creation times."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_observer_fills_the_same_buckets_and_sum_as_observe():
    public, fast = CollectorRegistry(), CollectorRegistry()
    expected = Histogram("t_seconds", "t", ["route"], buckets=BUCKETS, registry=public)
    actual = Histogram("t_seconds", "t", ["route"], buckets=BUCKETS, registry=fast)
    observe = metrics.observer(actual, "chat")
    for amount in amounts():
        expected.labels("chat").observe(amount)
        observe(amount)
    lines = exposition(fast)
    assert lines == exposition(public)
    assert 't_seconds_count{route="chat"} 2014.0' in lines
    assert 't_seconds_bucket{le="0.001",route="chat"} 0.0' not in lines  # buckets are filled


def test_observer_is_made_once_per_label_values():
    histogram = Histogram("once_seconds", "o", ["route"], registry=CollectorRegistry())
    assert metrics.observer(histogram, "a") is metrics.observer(histogram, "a")
    assert metrics.observer(histogram, "a") is not metrics.observer(histogram, "b")


def test_incrementer_counts_like_inc_and_a_gauge_goes_both_ways():
    public, fast = CollectorRegistry(), CollectorRegistry()
    counters = [Counter("c_total", "c", ["status"], registry=r) for r in (public, fast)]
    gauges = [Gauge("g", "g", registry=r) for r in (public, fast)]
    count = metrics.incrementer(counters[1], "200")
    move = metrics.incrementer(gauges[1])
    for step in (1, 1, 3, 1):
        counters[0].labels("200").inc(step)
        count(step)
    gauges[0].inc(5)
    gauges[0].dec(2)
    move(5)
    move(-2)
    lines = exposition(fast)
    assert lines == exposition(public)
    assert 'c_total{status="200"} 6.0' in lines
    assert "g 3.0" in lines


def test_observer_and_incrementer_write_the_shared_files_under_workers(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR (as under `--workers`) the values are the shared
    files: two processes' observations are summed by the multiprocess collector."""
    script = textwrap.dedent("""
        import sys
        from prometheus_client import Counter, Histogram
        from gateway import metrics
        histogram = Histogram("w_seconds", "w", ["route"], buckets=(0.1, 1))
        counter = Counter("w_requests_total", "w", ["route"])
        observe = metrics.observer(histogram, "chat")
        count = metrics.incrementer(counter, "chat")
        for amount in map(float, sys.argv[1:]):
            observe(amount)
            count(1)
    """)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": ""}
    for values in (["0.05", "0.5"], ["2.0"]):
        subprocess.run([sys.executable, "-c", script, *values], env=env, check=True)
    collected = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            from prometheus_client import CollectorRegistry, generate_latest
            from prometheus_client.multiprocess import MultiProcessCollector
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            print(generate_latest(registry).decode())
        """)],
        env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert 'w_seconds_bucket{le="0.1",route="chat"} 1.0' in collected
    assert 'w_seconds_bucket{le="1.0",route="chat"} 2.0' in collected
    assert 'w_seconds_bucket{le="+Inf",route="chat"} 3.0' in collected
    assert 'w_seconds_sum{route="chat"} 2.55' in collected
    assert 'w_requests_total{route="chat"} 3.0' in collected


def test_under_workers_an_iterations_amounts_reach_the_files_once_at_its_end(tmp_path):
    """In an event loop the shared files are written at the end of the iteration, each value
    once for all its amounts; a scrape (`flush_shared`) writes them at once; a gauge's +1 and
    -1 within one iteration leave its file alone."""
    script = textwrap.dedent("""
        import asyncio, json
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.multiprocess import MultiProcessCollector
        from gateway import metrics
        histogram = Histogram("l_seconds", "l", ["route"], buckets=(0.1, 1))
        counter = Counter("l_requests_total", "l", ["route"])
        gauge = Gauge("l_in_flight", "l", multiprocess_mode="livesum")
        writes = []
        value_class = type(counter.labels("chat")._value)
        real_inc = value_class.inc
        def counted_inc(self, amount):
            writes.append(amount)
            real_inc(self, amount)
        value_class.inc = counted_inc
        observe = metrics.observer(histogram, "chat")
        count = metrics.incrementer(counter, "chat")
        in_flight = metrics.incrementer(gauge)

        def read():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return {s.name + str(sorted(s.labels.items())): s.value
                    for m in registry.collect() for s in m.samples}

        async def main():
            out = {}
            for amount in (0.05, 0.5, 0.07):
                in_flight(1)
                observe(amount)
                count(1)
                in_flight(-1)
            out["during"] = read().get("l_requests_total[('route', 'chat')]", 0.0)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            out["after"] = read()
            out["writes"] = list(writes)
            count(1)
            metrics.flush_shared()
            out["scraped"] = read()["l_requests_total[('route', 'chat')]"]
            return out

        print(json.dumps(asyncio.run(main())))
    """)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": ""}
    done = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                          capture_output=True, text=True)  # fmt: skip
    out = json.loads(done.stdout)
    assert out["during"] == 0.0
    after = out["after"]
    assert after["l_requests_total[('route', 'chat')]"] == 3.0
    assert after["l_seconds_bucket[('le', '0.1'), ('route', 'chat')]"] == 2.0
    assert after["l_seconds_bucket[('le', '1.0'), ('route', 'chat')]"] == 3.0
    assert after["l_seconds_sum[('route', 'chat')]"] == pytest.approx(0.62)
    assert after["l_in_flight[]"] == 0.0
    # sum, two buckets and the counter: one write each; the gauge's +3 -3 none.
    assert sorted(round(amount, 9) for amount in out["writes"]) == [0.62, 1.0, 2.0, 3.0]
    assert out["scraped"] == 4.0
