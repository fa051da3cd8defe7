"""The provider's total deadline: it bounds the whole call, headers, body and stream alike.

`timeouts.total` is enforced by the outbound client for the whole exchange with the provider,
while `first_byte` and `idle` bound the waits for headers and between stream chunks.
"""

from __future__ import annotations

import time

import openai
import pytest

from tests.conftest import base_config
from tests.fakes.upstream import Fault

HELLO = [{"role": "user", "content": "hello there, general"}]


async def test_total_deadline_bounds_a_slow_answer_before_first_byte(provider, start_gateway):
    config = base_config(provider)
    config["providers"]["fake"]["timeouts"] = {"first_byte": 30, "total": 0.3}
    gw = await start_gateway(config)
    provider.fail(Fault(hang=True))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        await gw.client().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert time.monotonic() - started < 5


async def test_total_deadline_ends_a_stream_that_never_goes_idle(provider, start_gateway):
    config = base_config(provider)
    config["providers"]["fake"]["timeouts"] = {"idle": 5, "total": 0.5}
    gw = await start_gateway(config)
    provider.control.settings = provider.control.settings.model_copy(update={"chunk_delay_ms": 50})
    provider.reply("x" * 200, chunks=["x"] * 200)  # 10 s of chunks, each well within `idle`
    stream = await gw.client().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True
    )
    seen = 0
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            seen += 1
    assert caught.value.code == "upstream_timeout"
    assert 1 < seen < 200
    assert time.monotonic() - started < 5


async def test_a_stream_within_its_deadline_is_untouched(provider, start_gateway):
    config = base_config(provider)
    config["providers"]["fake"]["timeouts"] = {"idle": 1, "total": 5}
    gw = await start_gateway(config)
    provider.control.settings = provider.control.settings.model_copy(update={"chunk_delay_ms": 20})
    provider.reply("abcdef", chunks=["ab", "cd", "ef"])
    stream = await gw.client().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "abcdef"
