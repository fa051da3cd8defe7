"""EnforcePolicy hooks called directly on exchanges, with policies from a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import metrics
from gateway.config import PolicySettings
from gateway.errors import ContentPolicyError
from gateway.exchange import Exchange, Principal
from gateway.policy_store import PolicyStore
from gateway.sse import SseEvent
from gateway.stages.enforce_policy import EnforcePolicy

RULES = """
id: {id}
version: "4"
mode: {mode}
rules:
  - id: no-secrets
    kind: words
    words: ["project bluebird"]
    action: {action}
    severity: high
    replacement: "[P]"
  - id: canary
    kind: canary
  - id: shape
    kind: request
    denied_models: ["fast"]
    images: false
    max_tokens: 256
    force_store_false: true
    pseudonymize_user: true
  - id: short
    kind: max_length
    max_chars: {max_chars}
    action: redact
"""


async def make_stage(tmp_path: Path, *, action="block", mode="enforce", max_chars=1000, **settings):
    (tmp_path / "p.yaml").write_text(
        RULES.format(id="p", action=action, mode=mode, max_chars=max_chars)
    )
    config = PolicySettings(enabled=True, directory=tmp_path, reload=False, **settings)
    store = PolicyStore(config)
    await store.open()
    return EnforcePolicy(store, config)


def chat(content, *, model="gpt-4o-mini", principal=None, **extra) -> Exchange:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    exchange = Exchange(
        "req_1", "chat.completions", "POST", "/v1/chat/completions", {}, "", body=body
    )
    exchange.model = model
    exchange.principal = principal
    return exchange


async def test_blocked_prompt_names_policy_and_rule(tmp_path):
    stage = await make_stage(tmp_path)
    exchange = chat("tell me about Project  Bluebird")
    with pytest.raises(ContentPolicyError) as raised:
        await stage.on_request(exchange)
    assert raised.value.error_code == "content_policy_violation"
    assert "'p'" in raised.value.message and "'no-secrets'" in raised.value.message
    assert "bluebird" not in raised.value.message.lower()
    [decision] = exchange.decisions
    assert (decision.policy_id, decision.policy_version, decision.rule_id) == (
        "p",
        "4",
        "no-secrets",
    )
    assert decision.direction == "prompt" and decision.policy_set_hash.startswith("sha256:")


async def test_redacted_prompt_is_rewritten(tmp_path):
    stage = await make_stage(tmp_path, action="redact")
    exchange = chat("about project bluebird today")
    await stage.on_request(exchange)
    assert exchange.body["messages"][-1]["content"] == "about [P] today"
    assert exchange.body_changed


@pytest.mark.parametrize(("action", "mode"), [("flag", "enforce"), ("block", "shadow")])
async def test_flag_and_shadow_pass_the_text_and_record(tmp_path, action, mode):
    stage = await make_stage(tmp_path, action=action, mode=mode)
    exchange = chat("about project bluebird")
    await stage.on_request(exchange)
    assert exchange.body["messages"][-1]["content"] == "about project bluebird"
    assert [d.rule_id for d in exchange.decisions] == ["no-secrets"]
    assert exchange.decisions[0].mode == mode


async def test_each_decision_is_logged_and_counted_with_every_field(tmp_path, log_buffer):
    counter = metrics.POLICY_DECISIONS.labels("prompt", "flag", "high", "enforce")
    before = counter._value.get()
    stage = await make_stage(tmp_path, action="flag")
    for _ in range(2):  # the second request reuses what the first prepared
        await stage.on_request(chat("about project bluebird, project bluebird"))
    lines = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    logged = [line for line in lines if line["event"] == "policy_decision"]
    assert len(logged) == 2 and counter._value.get() == before + 2
    [hash_] = {line.pop("policy_set_hash") for line in logged}
    assert hash_.startswith("sha256:")
    for line in logged:
        assert line.pop("timestamp")
        assert line == {
            "logger_name": "gateway.policy", "policy_id": "p", "policy_version": "4",
            "rule_id": "no-secrets", "action": "flag", "severity": "high", "mode": "enforce",
            "direction": "prompt", "enforced": True, "detail": None,
            "event": "policy_decision", "level": "info",
        }  # fmt: skip


async def test_request_constraints(tmp_path):
    stage = await make_stage(tmp_path)
    with pytest.raises(ContentPolicyError, match="shape"):
        await stage.on_request(chat("hi", model="fast"))
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(ContentPolicyError, match="images"):
        await stage.on_request(chat(image))
    alice = chat("hi", principal=Principal("alice", "acme"), user="alice@example.com")
    await stage.on_request(alice)
    body = alice.body
    assert body["max_tokens"] == 256 and body["store"] is False
    assert body["user"] == body["safety_identifier"] != "alice@example.com"
    again = chat("hi", principal=Principal("alice", "acme"))
    bob = chat("hi", principal=Principal("bob", "acme"))
    await stage.on_request(again)
    await stage.on_request(bob)
    assert again.body["safety_identifier"] == body["user"] != bob.body["safety_identifier"]


async def test_canary_goes_into_the_system_prompt(tmp_path):
    stage = await make_stage(tmp_path)
    exchange = chat("hi")
    exchange.body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    await stage.on_request(exchange)
    assert exchange.canary and exchange.canary.startswith("cnry-")
    assert exchange.body["messages"][0]["content"] == f"[{exchange.canary}]\nBe brief."
    responses = Exchange("r", "responses", "POST", "/v1/responses", {}, "",
                         body={"model": "m", "input": "hi"})  # fmt: skip
    responses.model = "m"
    await stage.on_request(responses)
    assert responses.body["instructions"].startswith(f"[{responses.canary}]")


async def test_blocked_completion_becomes_content_filter_or_error(tmp_path):
    stage = await make_stage(tmp_path)
    exchange = chat("hi")
    await stage.on_request(exchange)

    def leaked():
        message = {"role": "assistant", "content": f"my prompt: [{exchange.canary}]"}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    answer = await stage.on_response(exchange, leaked())
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    assert answer["choices"][0]["message"]["content"] == ""
    assert exchange.decisions[-1].rule_id == "canary"
    strict = await make_stage(tmp_path, completion_block="error")
    with pytest.raises(ContentPolicyError, match="canary"):
        await strict.on_response(exchange, leaked())


async def test_an_answer_is_judged_by_the_policy_set_its_request_was(tmp_path):
    stage = await make_stage(tmp_path)
    exchange = chat("hi")
    await stage.on_request(exchange)
    (tmp_path / "p.yaml").write_text(
        RULES.format(id="reloaded", action="block", mode="enforce", max_chars=5000)
    )
    assert await stage._store.reload()
    message = {"role": "assistant", "content": f"my prompt: [{exchange.canary}]"}
    answer = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    await stage.on_response(exchange, answer)
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    assert exchange.decisions[-1].policy_id == "p"
    later = chat("hi")
    await stage.on_request(later)
    await stage.on_response(later, {"choices": []})
    assert later.decisions == []


async def test_responses_answer_is_marked_incomplete(tmp_path):
    stage = await make_stage(tmp_path)
    exchange = Exchange("r", "responses", "POST", "/v1/responses", {}, "", body={"model": "m"})
    exchange.model = "m"
    answer = {"status": "completed", "output": [{"type": "message", "content": [
        {"type": "output_text", "text": "the project bluebird plan"}]}]}  # fmt: skip
    result = await stage.on_response(exchange, answer)
    assert result["status"] == "incomplete"
    assert result["incomplete_details"] == {"reason": "content_filter"}


def chunk(text: str | None, finish: str | None = None) -> SseEvent:
    delta = {} if text is None else {"content": text}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return SseEvent(json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]}))


async def events(*items: SseEvent):
    for item in items:
        yield item


async def collect(stage, exchange, *items):
    out = [e async for e in stage.on_stream(exchange, events(*items))]
    texts = [json.loads(e.data) for e in out if not e.is_done]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in texts if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in texts if c["choices"]]
    return out, content, finish


async def test_stream_block_ends_with_content_filter_and_done(tmp_path):
    stage = await make_stage(tmp_path)
    exchange = chat("hi", stream=True)
    out, content, finish = await collect(
        stage, exchange, chunk("ok, the proj"), chunk("ect blue"), chunk("bird is"),
        chunk(None, "stop"), SseEvent("[DONE]"),
    )  # fmt: skip
    assert content == "ok, the "
    assert finish[-1] == "content_filter" and out[-1].is_done
    assert exchange.decisions[-1].direction == "completion"


async def test_stream_redaction_and_length_cap(tmp_path):
    stage = await make_stage(tmp_path, action="redact", max_chars=12)
    exchange = chat("hi", stream=True)
    out, content, finish = await collect(
        stage, exchange, chunk("a project "), chunk("bluebird and much more"),
        chunk(None, "stop"), SseEvent("[DONE]"),
    )  # fmt: skip
    assert content == "a [P] and mu"
    assert finish[-1] == "length"


async def test_clean_stream_is_unchanged(tmp_path):
    stage = await make_stage(tmp_path)
    exchange = chat("hi", stream=True)
    _, content, finish = await collect(
        stage, exchange, chunk(""), chunk("hello "), chunk("world"), chunk(None, "stop"),
        SseEvent("[DONE]"),
    )  # fmt: skip
    assert content == "hello world" and finish[-1] == "stop"
    assert exchange.decisions == []
