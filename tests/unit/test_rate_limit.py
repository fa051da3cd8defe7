"""The RateLimit stage on the memory backend with a fake clock: which limits apply, headers,
refusals, body changes, stream metering and cutting, and settlement."""

from __future__ import annotations

import json

import pytest

from gateway.config import LimitSettings, RedisSettings
from gateway.errors import QuotaExceededError, RateLimitError
from gateway.event_json import json_event
from gateway.exchange import Exchange, Principal, Usage
from gateway.limiter import Limiter
from gateway.limits import Ask, Limit, Standing, decision_from
from gateway.sse import SseEvent
from gateway.stages.rate_limit import RateLimit, _headers, _layout_of, duration, rate_headers
from gateway.tokens import count_prompt

MESSAGES = [{"role": "user", "content": "abcd" * 5}]
PROMPT = count_prompt("chat.completions", {"messages": MESSAGES})


def stage(clock: list[float] | None = None, **limits) -> RateLimit:
    settings = LimitSettings.model_validate({"enabled": True, "backend": "memory", **limits})
    now = clock or [1_750_000_000.0]
    return RateLimit(Limiter(settings, RedisSettings(), clock=lambda: now[0]), settings)


def exchange(principal: Principal | None = None, **body) -> Exchange:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, **body}
    ex = Exchange("req", "chat.completions", "POST", "/v1/chat/completions", {}, "127.0.0.1",
                  body=body, principal=principal, model="gpt-4o-mini")  # fmt: skip
    ex.is_stream = bool(body.get("stream"))
    ex.client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return ex


async def finish(rate_limit: RateLimit, ex: Exchange, usage: Usage | None) -> None:
    ex.upstream_attempts, ex.status, ex.usage = 1, 200, usage
    await rate_limit.on_complete(ex)


def chunk(text: str | None = None, finish: str | None = None, **extra) -> SseEvent:
    delta = {"content": text} if text is not None else {}
    return json_event({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                       **extra})  # fmt: skip


async def collect(events):
    return [e async for e in events]


async def feed(*events):
    for event in events:
        yield event


async def test_tier_by_claim_and_override_by_key():
    tiers = {"free": {"requests_per_minute": 1}, "pro": {"requests_per_minute": 5}}
    rate_limit = stage(tiers=tiers,
                       assignment={"default_tier": "free", "by_claim": {"gold": "pro"},
                                   "keys": {"k9": {"requests_per_minute": 2}}})  # fmt: skip
    gold = Principal("alice", tier="gold", key_id="k1")
    ex = exchange(gold)
    await rate_limit.on_request(ex)
    assert ex.response_headers["x-ratelimit-limit-requests"] == "5"
    overridden = exchange(Principal("bob", key_id="k9"))
    await rate_limit.on_request(overridden)
    assert overridden.response_headers["x-ratelimit-limit-requests"] == "2"


async def test_anonymous_callers_share_the_default_tier_and_global_limits():
    rate_limit = stage(tiers={"t": {"requests_per_minute": 9}}, assignment={"default_tier": "t"},
                       **{"global": {"requests_per_minute": 1}})  # fmt: skip
    await rate_limit.on_request(exchange())
    ex = exchange()
    with pytest.raises(RateLimitError) as refused:
        await rate_limit.on_request(ex)
    assert refused.value.headers["Retry-After"] == "60"
    assert refused.value.headers["retry-after-ms"] == "60000"
    assert "this gateway" in refused.value.message
    assert ex.ratelimit_outcome == "limited" and ex.ratelimit_reservation is None


async def test_each_caller_keeps_its_own_limits_and_budgets_follow_the_clock():
    clock = [1_750_000_000.0]
    tiers = {"free": {"requests_per_minute": 1}, "pro": {"daily_tokens": 10_000}}
    assignment = {"default_tier": "free", "by_tenant": {"acme": "pro"}}
    rate_limit = stage(clock, tiers=tiers, assignment=assignment)
    free, pro = exchange(Principal("ann")), exchange(Principal("ann", tenant="acme"))
    await rate_limit.on_request(free)
    await rate_limit.on_request(pro)
    with pytest.raises(RateLimitError):
        await rate_limit.on_request(exchange(Principal("ann")))  # free's one a minute: used
    clock[0] += 60
    later = exchange(Principal("ann", tenant="acme"))
    await rate_limit.on_request(later)
    assert free.response_headers["x-ratelimit-limit-requests"] == "1"
    assert pro.response_headers["x-ratelimit-limit-tokens"] == "10000"
    reset = [duration_ms(ex.response_headers["x-ratelimit-reset-tokens"]) for ex in (pro, later)]
    assert reset[0] - reset[1] == 60_000  # the budget's period ends a minute closer


def duration_ms(text: str) -> int:
    hours, _, rest = text.partition("h")
    minutes, _, seconds = rest.partition("m")
    return round((int(hours) * 3600 + int(minutes) * 60 + float(seconds.rstrip("s"))) * 1000)


async def test_budget_exhausted_is_insufficient_quota_and_not_retried():
    rate_limit = stage(tiers={"t": {"daily_tokens": PROMPT}}, assignment={"default_tier": "t"})
    with pytest.raises(QuotaExceededError) as refused:
        await rate_limit.on_request(exchange())
    assert refused.value.error_code == "insufficient_quota"
    assert refused.value.headers["x-should-retry"] == "false"


async def test_reservation_is_prompt_plus_max_tokens_and_settles_to_usage():
    rate_limit = stage(tiers={"t": {"tokens_per_minute": 1000}}, assignment={"default_tier": "t"})
    ex = exchange(max_tokens=100)
    await rate_limit.on_request(ex)
    assert ex.ratelimit_reservation.reservation.granted == PROMPT + 100
    assert ex.response_headers["x-ratelimit-remaining-tokens"] == str(1000 - PROMPT - 100)
    await finish(rate_limit, ex, Usage(10, 20))
    after = exchange(max_tokens=1)
    await rate_limit.on_request(after)
    assert after.response_headers["x-ratelimit-remaining-tokens"] == str(1000 - 30 - PROMPT - 1)


async def test_a_failed_call_is_refunded():
    rate_limit = stage(tiers={"t": {"daily_tokens": 1000}}, assignment={"default_tier": "t"})
    ex = exchange(max_tokens=100)
    await rate_limit.on_request(ex)
    ex.upstream_attempts, ex.status = 1, 502
    await rate_limit.on_complete(ex)
    again = exchange(max_tokens=100)
    await rate_limit.on_request(again)
    assert again.response_headers["x-ratelimit-remaining-tokens"] == str(1000 - PROMPT - 100)


async def test_streams_ask_for_usage_and_hide_the_usage_chunk():
    rate_limit = stage(tiers={"t": {"tokens_per_minute": 10_000}}, assignment={"default_tier": "t"})
    ex = exchange(stream=True)
    await rate_limit.on_request(ex)
    assert ex.body["stream_options"] == {"include_usage": True} and ex.body_changed
    usage = json_event({"id": "c", "choices": [], "usage": {"prompt_tokens": 3,
                                                            "completion_tokens": 4}})  # fmt: skip
    out = await collect(rate_limit.on_stream(ex, feed(chunk("hi"), chunk(finish="stop"), usage,
                                                      SseEvent("[DONE]"))))  # fmt: skip
    assert [e.data for e in out][-1] == "[DONE]" and len(out) == 3
    assert ex.usage == Usage(3, 4)


async def test_a_stream_is_cut_at_its_budget():
    allowance = 3
    rate_limit = stage(tiers={"t": {"daily_tokens": PROMPT + allowance}},
                       assignment={"default_tier": "t"})  # fmt: skip
    ex = exchange(stream=True, max_tokens=50, stream_options={"include_usage": True})
    await rate_limit.on_request(ex)
    assert ex.body["max_tokens"] == allowance
    out = await collect(rate_limit.on_stream(ex, feed(*(chunk("abcde") for _ in range(9)))))
    payloads = [json.loads(e.data) for e in out[:-1]]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"])
    assert text == ("abcde" * 3)[: allowance * 4]
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["usage"]["completion_tokens"] == allowance
    assert out[-1].data == "[DONE]"
    assert ex.usage == Usage(PROMPT, allowance)


async def test_concurrency_is_released_on_complete():
    rate_limit = stage(tiers={"t": {"concurrent": 1}}, assignment={"default_tier": "t"})
    first = exchange()
    await rate_limit.on_request(first)
    with pytest.raises(RateLimitError):
        await rate_limit.on_request(exchange())
    first.status = 499
    await rate_limit.on_complete(first)
    await rate_limit.on_request(exchange())


@pytest.mark.parametrize("limits", [{}, {"tiers": {"t": {}}, "assignment": {"default_tier": "t"}}])
async def test_no_limits_configured_changes_nothing(limits):
    rate_limit = stage(**limits)  # no tier, or a tier that sets no limit
    ex = exchange(stream=True)
    await rate_limit.on_request(ex)
    assert ex.ratelimit_outcome == "unlimited" and not ex.body_changed and not ex.response_headers


def test_headers_show_the_tightest_request_and_token_limit():
    def standing(kind: str, limit: int, remaining: int, reset_ms: int) -> Standing:
        return Standing(Limit("n", "key", f"k{limit}", kind, limit, 60_000), remaining, reset_ms)

    def headers(*standings: Standing) -> dict[str, str]:
        """The headers of a script reply that holds `standings`."""
        reply = [1, 0, 0, 0, *(n for s in standings for n in (s.remaining, s.reset_ms))]
        return rate_headers([s.limit for s in standings], reply)

    standings = (
        standing("r", 60, 5, 100), standing("c", 2, 0, 0), standing("r", 10, 5, 900),
        standing("r", 9, 7, 0), standing("t", 1000, 10, 5), standing("b", 50, 3, 7),
    )  # fmt: skip
    assert headers(*standings) == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "900ms", "x-ratelimit-limit-tokens": "50",
        "x-ratelimit-remaining-tokens": "3", "x-ratelimit-reset-tokens": "7ms",
    }  # fmt: skip
    assert headers(*standings[1:2]) == {}  # concurrency alone has no OpenAI header
    short = rate_headers([s.limit for s in standings], [1, 0, 0, 0, 5, 100, 0, 0, 4])
    assert short["x-ratelimit-remaining-requests"] == "5"  # a short reply: the limits it covers
    assert "x-ratelimit-limit-tokens" not in short


def _limit(kind: str, limit: int) -> Limit:
    return Limit("n", "key", f"k{kind}{limit}", kind, limit, 60_000)


@pytest.mark.parametrize("kinds", ["rtc", "crb", "tr", "r", "tc", "c", "rrt", "rtb", "bcr"])
@pytest.mark.parametrize("covered", [None, 1, 0])  # whole reply, or one short of some limits
def test_headers_at_the_plans_places_are_those_found_by_looking(kinds, covered):
    limits = tuple(_limit(kind, 10 * (i + 1)) for i, kind in enumerate(kinds))
    pairs = [n for i in range(len(kinds)) for n in (7 - i, 1500 * i)]
    reply = [1, 0, 0, 5, *pairs[: None if covered is None else 2 * covered]]
    decision = decision_from(Ask("id", limits, 5, 1), reply, "memory")
    layout = _layout_of(limits)
    assert (layout is not None) == (
        kinds.count("r") == 1 and sum(kind in "tb" for kind in kinds) == 1
    )
    assert _headers(layout, decision) == rate_headers(limits, reply)


@pytest.mark.parametrize(("ms", "text"), [(0, "0ms"), (20, "20ms"), (1000, "1s"), (1500, "1.5s"),
                                          (360_000, "6m0s"), (3_723_500, "1h2m3.5s")])  # fmt: skip
def test_reset_durations_use_openai_format(ms, text):
    assert duration(ms) == text
