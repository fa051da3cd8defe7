"""The request path's `observer` and `incrementer` against prometheus_client's public API.

They write to prometheus_client's value objects directly; if a release of the library changes
how a histogram keeps its buckets, these tests fail instead of the metrics going wrong.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

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
