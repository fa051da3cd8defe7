"""The RedactPrompt stage with a fake analyzer: what is scanned, actions, restoring, streams."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway.errors import ContentPolicyError, InvalidRequestError
from gateway.event_json import json_event
from gateway.exchange import Exchange
from gateway.log import configure_logging
from gateway.placeholders import Holdback
from gateway.redaction_rules import EntityRule, RedactionRules
from gateway.redactor import Finding
from gateway.sse import SseEvent
from gateway.stages.redact_prompt import RedactPrompt

WORDS = {"Alice Smith": "PERSON", "alice@example.org": "EMAIL_ADDRESS", "hunter2pass": "SECRET"}


class FakeAnalyzer:
    """Finds the fixed WORDS; records every text it was asked about."""

    def __init__(self, rules: RedactionRules | None = None) -> None:
        self.rules = rules or RedactionRules()
        self.seen: list[str] = []

    async def analyze(self, texts: Sequence[str], rules: RedactionRules) -> list[list[Finding]]:
        self.seen.extend(texts)
        out = []
        for text in texts:
            found = [Finding(m.start(), m.end(), entity, 1.0)
                     for word, entity in WORDS.items() for m in re.finditer(re.escape(word), text)
                     if rules.rule_for(entity).action != "allow"]  # fmt: skip
            out.append(sorted(found, key=lambda f: f.start))
        return out

    def keyed_hash(self, value: str) -> str:
        return "h" * 12


def _exchange(endpoint: str, body: dict[str, Any]) -> Exchange:
    return Exchange("req_1", endpoint, "POST", "/", {}, "127.0.0.1", body=body)


async def _redact(endpoint: str, body: dict[str, Any], rules: RedactionRules | None = None):
    analyzer = FakeAnalyzer(rules)
    exchange = _exchange(endpoint, body)
    await RedactPrompt(analyzer).on_request(exchange)
    return exchange, analyzer


async def test_chat_every_text_is_scanned_and_same_value_same_placeholder():
    body = {"messages": [
        {"role": "system", "content": "Help Alice Smith."},
        {"role": "user", "name": "Alice Smith", "content": [
            {"type": "text", "text": "I am Alice Smith, mail alice@example.org"},
            {"type": "image_url", "image_url": {"url": "data:,"}}]},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": json.dumps({"to": ["alice@example.org"], "n": 1})}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sent to Alice Smith"},
    ]}  # fmt: skip
    exchange, _ = await _redact("chat.completions", body)
    dumped = json.dumps(exchange.body)
    assert "Alice Smith" not in dumped and "alice@example.org" not in dumped
    messages = exchange.body["messages"]
    assert messages[0]["content"] == "Help <PERSON_1>."
    assert messages[1]["name"] == "<PERSON_1>"
    assert json.loads(messages[2]["tool_calls"][0]["function"]["arguments"]) == {
        "to": ["<EMAIL_ADDRESS_1>"], "n": 1}  # fmt: skip
    assert messages[3]["content"] == "sent to <PERSON_1>"
    assert exchange.redaction_counts == {"PERSON": 4, "EMAIL_ADDRESS": 2}
    assert exchange.placeholders == {"<PERSON_1>": "Alice Smith",
                                     "<EMAIL_ADDRESS_1>": "alice@example.org"}  # fmt: skip
    assert exchange.body_changed


@pytest.mark.parametrize(("endpoint", "body", "path"), [
    ("responses", {"instructions": "Alice Smith", "input": "x"}, ("instructions",)),
    ("responses", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "Alice Smith"}]}]}, ("input", 0, "content", 0, "text")),
    ("responses", {"input": [{"type": "function_call_output", "call_id": "c",
                              "output": "Alice Smith"}]}, ("input", 0, "output")),
    ("completions", {"prompt": ["ok", "Alice Smith"]}, ("prompt", 1)),
    ("chat.completions", {"messages": [{"role": "assistant", "content": None,
                                        "refusal": "Alice Smith"}]}, ("messages", 0, "refusal")),
    ("chat.completions", {"messages": [{"role": "assistant", "content": None, "function_call": {
        "name": "f", "arguments": "Alice Smith"}}]},
     ("messages", 0, "function_call", "arguments")),
    ("embeddings", {"input": "Alice Smith"}, ("input",)),
])  # fmt: skip
async def test_other_endpoints_are_scanned(endpoint, body, path):
    exchange, _ = await _redact(endpoint, body)
    node: Any = exchange.body
    for step in path:
        node = node[step]
    assert node == "<PERSON_1>"


async def test_token_arrays_are_refused():
    with pytest.raises(InvalidRequestError):
        await _redact("embeddings", {"input": [[1, 2, 3]]})


async def test_images_refused_when_the_rules_say_so():
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}  # fmt: skip
    with pytest.raises(ContentPolicyError) as caught:
        await _redact("chat.completions", body, RedactionRules(images="refuse"))
    assert caught.value.param == "messages[0].content[0]"


async def test_block_names_the_type_never_the_value():
    rules = RedactionRules(entities={"EMAIL_ADDRESS": EntityRule(action="block")})
    body = {"messages": [{"role": "user", "content": "mail alice@example.org"}]}
    with pytest.raises(ContentPolicyError) as caught:
        await _redact("chat.completions", body, rules)
    assert "EMAIL_ADDRESS" in caught.value.message
    assert "alice" not in caught.value.message


async def test_mask_hash_and_allow():
    rules = RedactionRules(entities={
        "PERSON": EntityRule(action="mask"), "EMAIL_ADDRESS": EntityRule(action="hash"),
        "SECRET": EntityRule(action="allow")})  # fmt: skip
    body = {"messages": [{"role": "user", "content": "Alice Smith alice@example.org hunter2pass"}]}
    exchange, _ = await _redact("chat.completions", body, rules)
    assert exchange.body["messages"][0]["content"] == (
        "***** ***** <EMAIL_ADDRESS#hhhhhhhhhhhh> hunter2pass"
    )
    assert exchange.placeholders == {}


async def test_each_request_follows_its_own_rules():
    masked = RedactionRules(entities={"PERSON": EntityRule(action="mask")})
    blocked = RedactionRules(entities={"PERSON": EntityRule(action="block")})
    per_tenant = {"a": RedactionRules(), "b": masked, "c": blocked}
    stage = RedactPrompt(FakeAnalyzer(), rules_for=lambda exchange: per_tenant[exchange.path])
    expected = {"a": "hi <PERSON_1>", "b": "hi ***** *****"}
    actions = ("pseudonymize", "mask", "block")
    before = {action: _counted("PERSON", action) for action in actions}
    for tenant in ("a", "b", "c", "a", "b"):
        exchange = _exchange("chat.completions", {"messages": [
            {"role": "user", "content": "hi Alice Smith"}]})  # fmt: skip
        exchange.path = tenant
        if tenant == "c":
            with pytest.raises(ContentPolicyError):
                await stage.on_request(exchange)
            continue
        await stage.on_request(exchange)
        assert exchange.body["messages"][0]["content"] == expected[tenant]
    counted = [_counted("PERSON", action) - before[action] for action in actions]
    assert counted == [2, 2, 1]


def _counted(entity: str, action: str) -> float:
    labels = {"entity": entity, "action": action}
    return REGISTRY.get_sample_value("gateway_redaction_entities_total", labels) or 0.0


async def test_client_written_placeholders_are_not_reused():
    body = {"messages": [{"role": "user", "content": "<PERSON_1> wrote to Alice Smith"}]}
    exchange, _ = await _redact("chat.completions", body)
    assert exchange.body["messages"][0]["content"] == "<PERSON_1> wrote to <PERSON_2>"
    completion = {"choices": [{"message": {"content": "<PERSON_1> and <PERSON_2>"}}]}
    restored = await RedactPrompt(FakeAnalyzer()).on_response(exchange, completion)
    assert restored["choices"][0]["message"]["content"] == "<PERSON_1> and Alice Smith"


async def test_nothing_found_leaves_the_body_untouched():
    exchange, analyzer = await _redact(
        "chat.completions", {"messages": [{"role": "user", "content": "hello"}]}
    )
    assert not exchange.body_changed and analyzer.seen == ["hello"]


@pytest.mark.parametrize("level", ["debug", "info"])
async def test_redaction_counts_are_a_debug_event(level, log_buffer):
    configure_logging(level, "json", stream=log_buffer)
    body = {"messages": [{"role": "user", "content": "Alice Smith alice@example.org"}]}
    await _redact("chat.completions", body)
    events = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    redacted = [event for event in events if event["event"] == "prompt_redacted"]
    expected = {"PERSON": 1, "EMAIL_ADDRESS": 1}
    assert redacted == ([] if level == "info" else [{**redacted[0], "entities": expected}])
    assert "Alice" not in log_buffer.getvalue()


def _restoring_exchange(restore_secret: bool = False) -> Exchange:
    exchange = _exchange("chat.completions", {})
    exchange.placeholders = {"<PERSON_1>": 'Al "Smith"', "<SECRET_1>": "hunter2pass"}
    exchange.restorable = {"<PERSON_1>"} | ({"<SECRET_1>"} if restore_secret else set())
    return exchange


async def test_response_restores_content_and_tool_arguments_but_not_secrets():
    completion = {"choices": [{"message": {
        "content": "Hi <PERSON_1>, key <SECRET_1>, not <PERSON_3>",
        "tool_calls": [{"function": {"arguments": '{"to": "<PERSON_1>"}'}}]}}]}  # fmt: skip
    out = await RedactPrompt(FakeAnalyzer()).on_response(_restoring_exchange(), completion)
    message = out["choices"][0]["message"]
    assert message["content"] == 'Hi Al "Smith", key <SECRET_1>, not <PERSON_3>'
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"to": 'Al "Smith"'}


def test_holdback_holds_only_a_possible_placeholder():
    hold = Holdback({"<PERSON_1>": "Al", "<PERSON_12>": "Bo"})
    assert hold.feed("a <b> <PER") == "a <b> "
    assert hold.feed("SON_1") == ""
    assert hold.feed("2> x <PERSON_1> <X") == "Bo x Al <X"
    assert hold.feed(" <PERSON_1") == " "
    assert hold.flush() == "<PERSON_1"


async def _events(payloads: list[Any]) -> AsyncIterator[SseEvent]:
    for payload in payloads:
        yield SseEvent(payload) if isinstance(payload, str) else json_event(payload)


def _chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


async def _stream_text(exchange: Exchange, payloads: list[Any]) -> str:
    stage = RedactPrompt(FakeAnalyzer())
    text = ""
    async for event in stage.on_stream(exchange, _events(payloads)):
        if event.is_done:
            continue
        for choice in json.loads(event.data)["choices"]:
            text += choice["delta"].get("content") or ""
    return text


@pytest.mark.parametrize("cut", range(1, 16))
async def test_stream_placeholder_split_anywhere(cut):
    reply = "Hi <PERSON_1>, bye"
    payloads = [_chunk(reply[:cut]), _chunk(reply[cut:]), _chunk(finish="stop"), "[DONE]"]
    assert await _stream_text(_restoring_exchange(), payloads) == 'Hi Al "Smith", bye'


async def test_stream_without_finish_reason_flushes_the_tail_before_done():
    payloads = [_chunk("Hi <PERSON_1"), "[DONE]"]
    assert await _stream_text(_restoring_exchange(), payloads) == "Hi <PERSON_1"


async def test_stream_untouched_without_restorable_placeholders():
    events = _events([_chunk("x"), "[DONE]"])
    assert RedactPrompt(FakeAnalyzer()).on_stream(_exchange("chat.completions", {}), events) \
        is events  # fmt: skip
