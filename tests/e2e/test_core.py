"""The proxy's wire behaviour through the official openai SDK, against the fake provider."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from tests.conftest import PROVIDER_KEY, TEST_KEY, RunningGateway, base_config, free_port
from tests.fakes.upstream import FakeProvider, Fault

HELLO = [{"role": "user", "content": "hello there, general"}]


async def test_chat_completion_round_trip(gateway, provider):
    completion = await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert completion.choices[0].message.content == "hello there, general"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert provider.last["messages"] == HELLO


async def test_sync_client_works_too(gateway, provider):
    client = gateway.sync_client()
    completion = await asyncio.to_thread(
        client.chat.completions.create, model="gpt-4o-mini", messages=HELLO
    )
    assert completion.choices[0].message.content == "hello there, general"


async def test_stream_delivers_every_chunk_and_usage_when_asked(gateway, provider):
    provider.reply("abcdefgh", chunks=["ab", "cde", "fgh"])
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert pieces == ["ab", "cde", "fgh"]
    assert usage is not None and usage.completion_tokens > 0


async def test_model_alias_is_rewritten_for_the_provider(gateway, provider):
    completion = await gateway.client().chat.completions.create(model="fast", messages=HELLO)
    assert provider.last["model"] == "llama-3.1-8b"
    assert completion.choices[0].message.content == "hello there, general"


async def test_responses_non_stream_and_stream(gateway, provider):
    client = gateway.client()
    response = await client.responses.create(model="gpt-4o-mini", input="tell me more")
    assert response.output_text == "tell me more"
    provider.reply("streamed words", chunks=["stre", "amed ", "words"])
    stream = await client.responses.create(model="gpt-4o-mini", input="x", stream=True)
    kinds, deltas = [], []
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    assert deltas == ["stre", "amed ", "words"]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


async def test_completions_and_embeddings(gateway, provider):
    client = gateway.client()
    completion = await client.completions.create(model="gpt-4o-mini", prompt="say this")
    assert completion.choices[0].text == "say this"
    stream = await client.completions.create(model="gpt-4o-mini", prompt="abcdef", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "abcdef"
    embedding = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [d.index for d in embedding.data] == [0, 1]
    assert len(embedding.data[0].embedding) == 16
    assert provider.last["input"] == ["a", "b"]


async def test_models_are_the_configured_ones(gateway, provider):
    client = gateway.client()
    listed = [m.id async for m in client.models.list()]
    assert listed == ["gpt-4o-mini", "fast", "text-embedding-3-small"]
    assert (await client.models.retrieve("fast")).id == "fast"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-5-secret")
    assert caught.value.code == "model_not_found"
    assert provider.control.received == []  # the provider's own list is never consulted


async def test_unknown_model_is_404_before_the_provider(gateway, provider):
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.client().chat.completions.create(model="nope", messages=HELLO)
    assert caught.value.body["param"] == "model"
    assert provider.control.received == []


async def test_credentials_and_hop_by_hop_headers_stay_at_the_gateway(gateway, provider):
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": HELLO},
            headers={"Authorization": f"Bearer {TEST_KEY}", "x-api-key": TEST_KEY,
                     "api-key": TEST_KEY, "Cookie": "session=1", "Connection": "keep-alive",
                     "OpenAI-Organization": "org-client", "X-Request-Id": "trace-123",
                     "User-Agent": "probe/1.0"},
        )  # fmt: skip
        assert response.status == 200
        assert response.headers["x-request-id"] == "trace-123"
        assert "Set-Cookie" not in response.headers
    sent = {k.lower(): v for k, v in provider.control.received[-1].headers.items()}
    assert sent["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert sent["x-request-id"] == "trace-123"
    assert "user-agent" not in sent  # client details are not passed on unless configured
    assert TEST_KEY not in json.dumps(sent)
    for header in ("cookie", "x-api-key", "api-key", "openai-organization"):
        assert header not in sent


@pytest.mark.parametrize(
    ("forward", "expected"),
    [
        (None, {"openai-beta"}),  # the default: only what changes the API's behaviour
        (["openai-beta", "user-agent", "x-stainless-*"],
         {"openai-beta", "user-agent", "x-stainless-lang", "x-stainless-retry-count"}),
        ([], set()),
    ],
)  # fmt: skip
async def test_only_the_configured_client_headers_reach_the_provider(
    provider, start_gateway, forward, expected
):
    config = base_config(provider)
    if forward is not None:
        config["providers"]["fake"]["forward_headers"] = forward
    gw = await start_gateway(config)
    await gw.client().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, extra_headers={"OpenAI-Beta": "assistants=v2"}
    )
    sent = {k.lower(): v for k, v in provider.control.received[-1].headers.items()}
    candidates = {"openai-beta", "user-agent", "x-stainless-lang", "x-stainless-retry-count"}
    assert {name for name in candidates if name in sent} == expected
    if "user-agent" in expected:
        assert sent["user-agent"].startswith("AsyncOpenAI/Python")
    own = {"authorization", "x-request-id", "content-type", "content-length", "host",
           "accept-encoding", "accept"}  # fmt: skip
    stainless = "x-stainless-lang" in expected
    assert all(n in own | expected or (stainless and n.startswith("x-stainless-")) for n in sent)


async def test_request_id_is_generated_when_absent(gateway, provider):
    raw = await gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO
    )
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("req_")
    assert provider.control.received[-1].headers["X-Request-Id"] == request_id


async def test_a_stream_returns_its_request_id_once(gateway, provider):
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True},
            headers={"Authorization": f"Bearer {TEST_KEY}", "X-Request-Id": "trace-stream-1"},
        )
        assert b"[DONE]" in await response.read()
    assert response.headers.getall("x-request-id") == ["trace-stream-1"]
    assert provider.control.received[-1].headers["X-Request-Id"] == "trace-stream-1"


async def test_set_cookie_from_provider_never_comes_back(gateway, provider):
    provider.fail(Fault(status=400, headers={"Set-Cookie": "tracker=1"},
                        body={"error": {"message": "bad", "type": "invalid_request_error",
                                        "param": None, "code": None}}))  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert "set-cookie" not in {k.lower() for k in caught.value.response.headers}


@pytest.mark.parametrize(
    ("path", "exception"),
    [("/v1/unknown", openai.NotFoundError), ("/v1/files", openai.NotFoundError),
     ("/admin/../etc/passwd", openai.NotFoundError)],
)  # fmt: skip
async def test_unknown_paths_are_openai_shaped_404s(gateway, path, exception):
    with pytest.raises(exception) as caught:
        await gateway.client().get(path, cast_to=object)
    assert caught.value.body["type"] == "invalid_request_error"


async def test_a_known_path_with_the_wrong_method_is_an_openai_shaped_405(gateway):
    async with aiohttp.ClientSession() as http:
        response = await http.get(gateway.url + "/v1/chat/completions")
        body = await response.json()
        metrics = await (await http.get(gateway.url + "/metrics")).text()
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert response.headers["x-request-id"].startswith("req_")
    assert body["error"]["code"] == "method_not_allowed"
    assert body["error"]["type"] == "invalid_request_error"
    assert 'gateway_requests_total{model="",route="unmatched",status="405"} 1.0' in metrics


async def test_invalid_json_is_400_with_openai_shape(gateway):
    async with aiohttp.ClientSession() as http:
        response = await http.post(gateway.url + "/v1/chat/completions", data=b"{not json")
        body = await response.json()
    assert response.status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [({"messages": HELLO}, "model"), ({"model": "gpt-4o-mini"}, "messages"),
     ({"model": "gpt-4o-mini", "messages": []}, "messages"),
     ({"model": "gpt-4o-mini", "messages": HELLO, "stream": "yes"}, "stream")],
)  # fmt: skip
async def test_invalid_fields_name_the_param(gateway, provider, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().post("/chat/completions", body=body, cast_to=object)
    assert caught.value.param == param
    assert provider.control.received == []


async def test_oversized_body_is_413(provider, start_gateway):
    config = base_config(provider)
    config["server"] = {"max_body_bytes": 2048}
    gw = await start_gateway(config)
    with pytest.raises(openai.APIStatusError) as caught:
        await gw.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert caught.value.status_code == 413
    assert provider.control.received == []


async def test_unreachable_provider_is_502(provider, start_gateway):
    config = base_config(provider)
    config["providers"]["fake"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    gw = await start_gateway(config)
    with pytest.raises(openai.InternalServerError) as caught:
        await gw.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    assert PROVIDER_KEY not in caught.value.message


async def test_upstream_429_passes_through_with_its_body(gateway, provider):
    body = {"error": {"message": "slow down", "type": "requests", "param": None,
                      "code": "rate_limit_exceeded"}}  # fmt: skip
    provider.fail(Fault(status=429, body=body, headers={"Retry-After": "7"}))
    with pytest.raises(openai.RateLimitError) as caught:
        await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.body == body["error"]
    assert caught.value.response.headers["retry-after"] == "7"


async def test_retry_honours_retry_after_before_any_byte(provider, start_gateway):
    config = base_config(provider)
    config["providers"]["fake"]["retries"] = {"attempts": 2, "backoff_initial": 0.01}
    gw = await start_gateway(config)
    provider.fail(Fault(status=503, headers={"Retry-After": "0.05"}))
    completion = await gw.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert completion.choices[0].message.content == "hello there, general"
    assert len(provider.control.received) == 2


async def test_fallback_provider_takes_over_before_first_byte(provider, start_gateway):
    backup = await FakeProvider().start()
    try:
        config = base_config(provider)
        config["providers"]["fake"]["fallbacks"] = ["backup"]
        config["providers"]["backup"] = {"base_url": backup.url, "api_key": "sk-backup",
                                         "retries": {"attempts": 0}}  # fmt: skip
        config["models"][0]["fallback_models"] = {"backup": "backup-model"}
        gw = await start_gateway(config)
        provider.fail(Fault(status=500))
        stream = await gw.client().chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "hello there, general"
        assert backup.last["model"] == "backup-model"
        assert backup.control.received[-1].headers["Authorization"] == "Bearer sk-backup"
    finally:
        await backup.stop()


async def test_client_error_from_provider_is_not_retried_elsewhere(provider, start_gateway):
    backup = await FakeProvider().start()
    try:
        config = base_config(provider)
        config["providers"]["fake"]["fallbacks"] = ["backup"]
        config["providers"]["backup"] = {"base_url": backup.url}
        gw = await start_gateway(config)
        provider.fail(Fault(status=400))
        with pytest.raises(openai.BadRequestError):
            await gw.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert backup.control.received == []
    finally:
        await backup.stop()


async def test_provider_dying_mid_stream_gives_one_error_event(gateway, provider):
    provider.reply("abcdefghijkl", chunks=["abc", "def", "ghi", "jkl"])
    provider.fail(Fault(die_after=3))
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "abc", "def"]
    assert "closed the stream" in caught.value.message


async def test_client_disconnect_cancels_the_upstream_stream(gateway, provider):
    provider.control.settings = provider.control.settings.model_copy(update={"chunk_delay_ms": 50})
    provider.reply("x" * 400, chunks=["x"] * 400)
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True},
        )
        await response.content.readline()
        response.close()
    for _ in range(100):
        if provider.control.cancelled_streams:
            break
        await asyncio.sleep(0.02)
    assert provider.control.cancelled_streams == 1
    assert provider.control.finished_streams == 0


async def test_healthz_readyz_and_metrics(gateway):
    await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    async with aiohttp.ClientSession() as http:
        assert (await http.get(gateway.url + "/healthz")).status == 200
        ready = await http.get(gateway.url + "/readyz")
        assert (await ready.json())["status"] == "ready"
        text = await (await http.get(gateway.url + "/metrics")).text()
    assert 'gateway_requests_total{model="gpt-4o-mini",route="chat.completions",status="200"}' in (
        text
    )
    assert "gateway_upstream_seconds_bucket" in text
    assert "gateway_overhead_seconds_bucket" in text
    assert PROVIDER_KEY not in text


async def test_responses_stream_failure_raises_in_the_sdk(gateway, provider):
    provider.reply("abcdefghijkl", chunks=["abc", "def", "ghi", "jkl"])
    provider.fail(Fault(die_after=5))
    stream = await gateway.client().responses.create(model="gpt-4o-mini", input="x", stream=True)
    kinds = []
    with pytest.raises(openai.APIError) as caught:
        async for event in stream:
            kinds.append(event.type)
    assert kinds[-1] == "response.output_text.delta"
    assert caught.value.code == "upstream_unavailable"


@pytest.mark.parametrize(
    "timeouts",
    [{"first_byte": 0.2}, {"first_byte": 0.2, "idle": 0.1}, {"first_byte": 0.2, "idle": 5}],
)  # first_byte bounds the wait for headers whether idle is shorter, longer or the default
async def test_first_byte_limit_holds_whichever_enforces_it(provider, start_gateway, timeouts):
    config = base_config(provider)
    config["providers"]["fake"]["timeouts"] = timeouts
    gw = await start_gateway(config)
    provider.fail(Fault(hang=True))
    with pytest.raises(openai.InternalServerError) as caught:
        await gw.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == 504


async def test_idle_limit_bounds_a_non_stream_body_after_its_headers(provider, start_gateway):
    """Headers came in time, then half the body and silence: `idle` ends the wait with 504
    long before `total`, and the next request is answered."""
    config = base_config(provider)
    config["providers"]["fake"]["timeouts"] = {"first_byte": 5, "idle": 0.3, "total": 60}
    config["providers"]["fake"]["retries"] = {"attempts": 0}
    gw = await start_gateway(config)
    provider.fail(Fault(stall_body=True))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        await gw.client(max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert time.monotonic() - started < 3
    answer = await gw.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert answer.choices[0].message.content


async def stream_times_out(gw: RunningGateway) -> None:
    """A stream through `gw` ends with the SDK raising `upstream_timeout`."""
    stream = await gw.client().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert caught.value.code == "upstream_timeout"


@pytest.mark.parametrize(
    "timeouts", [{"idle": 0.2}, {"first_byte": 0.1, "idle": 0.2}, {"first_byte": 5, "idle": 0.2}]
)
async def test_idle_limit_holds_whichever_enforces_it(provider, start_gateway, timeouts):
    config = base_config(provider)
    config["providers"]["fake"]["timeouts"] = timeouts
    gw = await start_gateway(config)
    provider.control.settings = provider.control.settings.model_copy(
        update={"chunk_delay_ms": 1000}
    )
    await stream_times_out(gw)


async def test_oversized_header_never_reaches_a_log_line(gateway, log_buffer):
    secret = "sk-" + "Q" * 9000  # beyond aiohttp's default header limit in this test server
    async with aiohttp.ClientSession() as http:
        response = await http.get(gateway.url + "/v1/models", headers={"X-Api-Key": secret})
        assert response.status == 400
    logged = log_buffer.getvalue()
    assert "library_log_record" in logged  # aiohttp's own error became one JSON event
    assert "QQQQ" not in logged and "Traceback" not in logged


async def test_idle_limit_bounds_each_gap_not_the_whole_stream(provider, start_gateway):
    """Twelve chunks 100 ms apart take longer than `idle` (300 ms) in all, but no gap does:
    the stream arrives whole. Then a gap of 1 s ends the next stream with upstream_timeout."""
    config = base_config(provider)
    config["providers"]["fake"]["timeouts"] = {"first_byte": 5, "idle": 0.3}
    gw = await start_gateway(config)
    settings = provider.control.settings
    provider.control.settings = settings.model_copy(update={"chunk_delay_ms": 100})
    provider.reply("abcdefghijkl", chunks=list("abcdefghijkl"))
    started = time.monotonic()
    stream = await gw.client().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "abcdefghijkl"
    assert time.monotonic() - started > 1.0  # longer than idle, in gaps shorter than it

    provider.control.settings = settings.model_copy(update={"chunk_delay_ms": 1000})
    provider.reply("abc", chunks=list("abc"))
    await stream_times_out(gw)
