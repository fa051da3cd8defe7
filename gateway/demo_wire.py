"""The demo provider's OpenAI wire formats: JSON answers and SSE events, built from a reply.

Owns the shapes of chat completions (with tool calls), responses, completions, embeddings and
models, streamed (as `(event name, payload)` pairs ending in `[DONE]` where OpenAI sends it) or
not, with usage estimated from lengths. Pure builders: must not do I/O, hold state or import
anything from the gateway's request path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

EMBEDDING_SIZE = 16
Events = Iterator[tuple[str | None, dict[str, Any] | str]]
"""SSE events to send: (event name or None, JSON payload or a literal such as `[DONE]`)."""


@dataclass(slots=True)
class ScriptedReply:
    """The text of a reply and, optionally, the exact chunks to stream it in."""

    text: str
    chunks: list[str] | None = None
    match: str | None = None


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _chunks(reply: ScriptedReply, size: int) -> list[str]:
    if reply.chunks is not None:
        return list(reply.chunks)
    text = reply.text
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def tool_call(body: dict[str, Any], text: str) -> dict[str, Any] | None:
    """In echo mode a request offering tools gets a call to the first one, echoing the text."""
    tools = body.get("tools") or []
    messages = body.get("messages") or []
    if not tools or body.get("tool_choice") == "none":
        return None
    if messages and messages[-1].get("role") == "tool":
        return None
    name = tools[0].get("function", {}).get("name", "tool")
    arguments = json.dumps({"text": text})
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": arguments}}  # fmt: skip


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = _tokens(json.dumps(body.get("messages") or body.get("prompt") or body.get("input")))
    completion = _tokens(text)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def chat_completion(body: dict[str, Any], text: str, call: dict[str, Any] | None) -> dict[str, Any]:
    """A non-stream chat completion answering `text`, or calling the tool `call`."""
    message: dict[str, Any] = {"role": "assistant", "content": None if call else text,
                               "refusal": None}  # fmt: skip
    if call:
        message["tool_calls"] = [call]
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "demo"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if call else "stop"}],
        "usage": _usage(body, call["function"]["arguments"] if call else text),
    }  # fmt: skip


def chat_chunks(
    body: dict[str, Any], reply: ScriptedReply, call: dict[str, Any] | None, size: int
) -> Events:
    """A streamed chat completion: role, content (or tool call) deltas, finish, usage, [DONE]."""
    base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
            "created": int(time.time()), "model": body.get("model", "demo")}  # fmt: skip
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if with_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], **extra}

    yield None, chunk({"role": "assistant", "content": "" if not call else None})
    if call:
        head = {"index": 0, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
        yield None, chunk({"tool_calls": [head]})
        for piece in _chunks(ScriptedReply(call["function"]["arguments"]), size):
            yield None, chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    else:
        for piece in _chunks(reply, size):
            yield None, chunk({"content": piece})
    yield None, chunk({}, "tool_calls" if call else "stop")
    if with_usage:
        text = call["function"]["arguments"] if call else reply.text
        yield None, {**base, "choices": [], "usage": _usage(body, text)}
    yield None, "[DONE]"


def completion_chunks(body: dict[str, Any], reply: ScriptedReply, size: int) -> Events:
    """A streamed text completion: one chunk per piece, a stop chunk, usage if asked, [DONE]."""
    base = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion",
            "created": int(time.time()), "model": body.get("model", "demo")}  # fmt: skip
    for piece in _chunks(reply, size):
        yield None, {**base, "choices": [{"text": piece, "index": 0, "logprobs": None,
                                          "finish_reason": None}]}  # fmt: skip
    yield None, {**base, "choices": [{"text": "", "index": 0, "logprobs": None,
                                      "finish_reason": "stop"}]}  # fmt: skip
    if (body.get("stream_options") or {}).get("include_usage"):
        yield None, {**base, "choices": [], "usage": _usage(body, reply.text)}
    yield None, "[DONE]"


def text_completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    """A non-stream text completion answering `text`."""
    return {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model", "demo"),
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(body, text),
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": content}  # fmt: skip


def response_object(
    body: dict[str, Any], text: str, status: str, *, response_id: str | None = None,
    item_id: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    usage = _usage(body, text)
    output = [_message_item(item_id or "msg_" + uuid.uuid4().hex, text, status)] if text else []
    return {
        "id": response_id or "resp_" + uuid.uuid4().hex,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": body.get("model", "demo"),
        "output": output if status == "completed" else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "instructions": body.get("instructions"),
        "usage": {"input_tokens": usage["prompt_tokens"],
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": usage["completion_tokens"],
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": usage["total_tokens"]} if status == "completed" else None,
    }  # fmt: skip


def response_events(body: dict[str, Any], reply: ScriptedReply, size: int) -> Events:
    """A streamed response: created, in progress, the text deltas, the done events, completed."""
    response_id, item_id = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex
    sequence = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, "sequence_number": next(sequence), **fields}

    pending = response_object(body, "", "in_progress", response_id=response_id)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    yield event("response.output_item.added", output_index=0,
                item=_message_item(item_id, "", "in_progress"))  # fmt: skip
    yield event("response.content_part.added", **where,
                part={"type": "output_text", "text": "", "annotations": []})  # fmt: skip
    for piece in _chunks(reply, size):
        yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
    text = reply.text
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where,
                part={"type": "output_text", "text": text, "annotations": []})  # fmt: skip
    yield event("response.output_item.done", output_index=0,
                item=_message_item(item_id, text, "completed"))  # fmt: skip
    done = response_object(body, text, "completed", response_id=response_id, item_id=item_id)
    yield event("response.completed", response=done)


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [(b - 128) / 128 for b in digest[:EMBEDDING_SIZE]]


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    given = body.get("input", "")
    texts = [given] if isinstance(given, str) else [str(t) for t in given]
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(texts):
        vector = _embedding(text)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if as_base64 else vector
        )  # fmt: skip
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(_tokens(t) for t in texts)
    return {"object": "list", "data": data, "model": body.get("model", "demo"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "demo"}
