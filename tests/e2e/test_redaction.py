"""Prompt redaction end to end: the provider never sees seeded values; the client gets them back."""

from __future__ import annotations

import json
import random

import openai
import pytest
from faker import Faker

from tests.conftest import base_config
from tests.fakes.pii_samples import secret_makers

pytestmark = pytest.mark.slow


def _people() -> dict[str, str]:
    fake = Faker("en_US")
    fake.seed_instance(7)
    return {"name": fake.name(), "email": fake.email(), "ssn": fake.ssn()}


def _prompt(values: dict[str, str]) -> str:
    return (f"Please write to {values['name']} at {values['email']} about the claim; "
            f"my social security number is {values['ssn']}.")  # fmt: skip


def _received_text(provider) -> str:
    return json.dumps(provider.last)


@pytest.fixture
async def gateway(provider, start_gateway):
    redaction = {"enabled": True, "workers": 1, "hash_key": "test-hash-key"}
    return await start_gateway(base_config(provider, redaction=redaction))


async def test_chat_values_never_reach_provider_and_come_back_restored(gateway, provider):
    values = _people()
    client = gateway.client()
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": f"The user is {values['name']}."},
            {"role": "user", "content": _prompt(values)},
        ],  # fmt: skip
    )
    received = _received_text(provider)
    for value in values.values():
        assert value not in received
    assert "<PERSON_1>" in received and "<EMAIL_ADDRESS_1>" in received
    assert completion.choices[0].message.content == _prompt(values)


async def test_stream_restores_placeholders_split_at_every_chunk_boundary(gateway, provider):
    values = _people()
    client = gateway.client()
    reply = "Dear <PERSON_1>, we wrote to <EMAIL_ADDRESS_1>. <PERSON_9> is not yours."
    expected = reply.replace("<PERSON_1>", values["name"]).replace(
        "<EMAIL_ADDRESS_1>", values["email"]
    )
    for cut in range(1, len(reply)):
        provider.reply(reply, [reply[:cut], reply[cut:]])
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": _prompt(values)}],
            stream=True,
        )  # fmt: skip
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == expected, f"cut at {cut}"
    assert values["name"] not in _received_text(provider)


async def test_stream_of_single_characters_and_unfinished_placeholder(gateway, provider):
    values = _people()
    client = gateway.client()
    reply = "Hi <PERSON_1>! <PERS"
    provider.reply(reply, list(reply))
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": _prompt(values)}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f"Hi {values['name']}! <PERS"


async def test_tool_call_arguments_are_redacted_and_restored(gateway, provider):
    values = _people()
    client = gateway.client()
    tools = [{"type": "function", "function": {"name": "send_mail", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}}}}]  # fmt: skip
    messages = [
        {"role": "user", "content": "Mail them."},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"who": values["name"]})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": f"Address: {values['email']}"},
        {"role": "user", "content": _prompt(values)},
    ]  # fmt: skip
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=tools
    )
    received = _received_text(provider)
    for value in values.values():
        assert value not in received
    assert json.loads(provider.last["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {
        "who": "<PERSON_1>"
    }
    call = completion.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"text": _prompt(values)}

    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=tools, stream=True
    )
    arguments = ""
    async for chunk in stream:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            arguments += delta_call.function.arguments or ""
    assert json.loads(arguments) == {"text": _prompt(values)}


async def test_responses_api_stream_and_non_stream(gateway, provider):
    values = _people()
    client = gateway.client()
    response = await client.responses.create(
        model="gpt-4o-mini", instructions=f"Address {values['name']} politely.",
        input=_prompt(values),
    )  # fmt: skip
    received = _received_text(provider)
    for value in values.values():
        assert value not in received
    assert response.output_text == _prompt(values)

    reply = "Noted, <PERSON_1> (<EMAIL_ADDRESS_1>)."
    provider.reply(reply, [reply[:12], reply[12:20], reply[20:]])
    stream = await client.responses.create(model="gpt-4o-mini", input=_prompt(values), stream=True)
    deltas, done = [], ""
    async for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            done = event.response.output_text
    expected = f"Noted, {values['name']} ({values['email']})."
    assert "".join(deltas) == expected and done == expected


async def test_completions_and_embeddings_are_redacted(gateway, provider):
    values = _people()
    client = gateway.client()
    completion = await client.completions.create(model="gpt-4o-mini", prompt=_prompt(values))
    assert values["email"] not in _received_text(provider)
    assert completion.choices[0].text == _prompt(values)
    await client.embeddings.create(model="text-embedding-3-small", input=[_prompt(values), "ok"])
    received = _received_text(provider)
    assert values["email"] not in received and values["name"] not in received


async def test_secrets_are_not_restored_by_default(gateway, provider):
    key = secret_makers(random.Random(5))["AWS_ACCESS_KEY_ID"]()
    client = gateway.client()
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"why is {key} denied?"}]
    )
    assert key not in _received_text(provider)
    assert completion.choices[0].message.content == "why is <AWS_ACCESS_KEY_ID_1> denied?"


async def test_blocked_entity_is_refused_naming_the_type_only(provider, start_gateway):
    rules = {"entities": {"US_SSN": {"action": "block"}}}
    gateway = await start_gateway(base_config(
        provider, redaction={"enabled": True, "workers": 1, "rules": rules}))  # fmt: skip
    values = _people()
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": _prompt(values)}]
        )
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["code"] == "content_policy_violation"
    assert "US_SSN" in error["message"] and values["ssn"] not in str(error)
    assert error["param"] == "messages[0].content"
    assert provider.control.received == []
    ready = await gateway.client()._client.get(gateway.url + "/readyz")
    assert ready.status_code == 200


async def test_pattern_only_rules_redact_short_and_long_prompts_alike(provider, start_gateway):
    rules = {"entities": {"EMAIL_ADDRESS": {"action": "pseudonymize"},
                          "US_SSN": {"action": "pseudonymize"}}}  # fmt: skip
    redaction = {"enabled": True, "workers": 1, "rules": rules, "in_process_chars": 400}
    gateway = await start_gateway(base_config(provider, redaction=redaction))
    values = _people()
    client = gateway.client()
    for padding in ("", " Thanks." * 60):  # under and over the in-process cap
        prompt = _prompt(values) + padding
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )
        received = _received_text(provider)
        assert values["email"] not in received and values["ssn"] not in received
        assert "<EMAIL_ADDRESS_1>" in received and "<US_SSN_1>" in received
        assert completion.choices[0].message.content == prompt
