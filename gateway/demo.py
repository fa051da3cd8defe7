"""The built-in OpenAI-compatible demo provider: a small aiohttp server that answers like one.

Owns fake chat completions, responses, completions, embeddings and models in OpenAI's wire
formats, streamed or not, with echo / lorem / scripted replies, chunk sizes and latency, and a
`DemoControl` through which tests script faults and read what was received. Must not be used
for real traffic and must not import anything from the gateway's request path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import struct
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from multidict import CIMultiDict

from gateway.config import DemoSettings

_LOREM_TEXT = (
    "the gateway forwards each request to the model provider and returns the answer "
    "while it keeps secrets and personal data away from places they should not go"
)
LOREM = tuple(_LOREM_TEXT.split(" "))
EMBEDDING_SIZE = 16


@dataclass(slots=True)
class Fault:
    """A scripted misbehaviour for the next request.

    status: answer with this status and `body`; die_after: send this many stream chunks then
    drop the connection; hang: never answer; delay: seconds to wait before answering.
    """

    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    die_after: int | None = None
    hang: bool = False
    delay: float = 0.0


@dataclass(slots=True)
class Received:
    path: str
    headers: CIMultiDict[str]
    body: Any


@dataclass(slots=True)
class ScriptedReply:
    text: str
    chunks: list[str] | None = None
    match: str | None = None


@dataclass(slots=True)
class DemoControl:
    """What tests use to steer the demo provider and observe it."""

    settings: DemoSettings = field(default_factory=DemoSettings)
    received: list[Received] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    replies: deque[ScriptedReply] = field(default_factory=deque)
    script: list[ScriptedReply] = field(default_factory=list)
    open_streams: int = 0
    cancelled_streams: int = 0
    finished_streams: int = 0


def load_script(path: Path) -> list[ScriptedReply]:
    """Reads `[{match: REGEX?, reply: TEXT, chunks: [TEXT, ...]?}, ...]` from YAML."""
    items = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    return [
        ScriptedReply(str(i["reply"]) if "reply" in i else "".join(i["chunks"]),
                      i.get("chunks"), i.get("match"))
        for i in items
    ]  # fmt: skip


def create_demo_app(control: DemoControl | None = None) -> web.Application:
    control = control or DemoControl()
    if control.settings.script_file and not control.script:
        control.script = load_script(control.settings.script_file)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    handler = _Handler(control)
    app.router.add_post("/v1/chat/completions", handler.chat)
    app.router.add_post("/v1/responses", handler.responses)
    app.router.add_post("/v1/completions", handler.completions)
    app.router.add_post("/v1/embeddings", handler.embeddings)
    app.router.add_get("/v1/models", handler.models)
    app.router.add_get("/v1/models/{model}", handler.model)
    return app


class _Handler:
    def __init__(self, control: DemoControl) -> None:
        self.control = control

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], Fault | None]:
        body = await request.json()
        self.control.received.append(Received(request.path, CIMultiDict(request.headers), body))
        fault = self.control.faults.popleft() if self.control.faults else None
        delay = (fault.delay if fault else 0.0) + self.control.settings.latency_ms / 1000
        if delay:
            await asyncio.sleep(delay)
        if fault and fault.hang:
            await asyncio.sleep(3600)
        return body, fault

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault and fault.status:
            return _fault_response(fault)
        reply = self._reply(_chat_text(body))
        call = _tool_call(body, reply.text)
        if body.get("stream"):
            events = _chat_chunks(body, reply, call, self._size(body))
            return await self._stream(request, events, fault)
        return web.json_response(_chat_completion(body, reply.text, call))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault and fault.status:
            return _fault_response(fault)
        reply = self._reply(_responses_text(body))
        if body.get("stream"):
            events = _response_events(body, reply, self._size(body))
            return await self._stream(request, events, fault)
        return web.json_response(_response_object(body, reply.text, "completed"))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault and fault.status:
            return _fault_response(fault)
        prompt = body.get("prompt", "")
        reply = self._reply(prompt if isinstance(prompt, str) else " ".join(map(str, prompt)))
        if body.get("stream"):
            events = _completion_chunks(body, reply, self._size(body))
            return await self._stream(request, events, fault)
        return web.json_response(_text_completion(body, reply.text))

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault and fault.status:
            return _fault_response(fault)
        return web.json_response(_embeddings(body))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [_model("demo")]})

    async def model(self, request: web.Request) -> web.Response:
        return web.json_response(_model(request.match_info["model"]))

    def _size(self, body: dict[str, Any]) -> int:
        """Chunk size: the request's `metadata.demo_chunk_chars`, else the configured one."""
        metadata = body.get("metadata") or {}
        size = metadata.get("demo_chunk_chars") if isinstance(metadata, dict) else None
        return int(size) if size else self.control.settings.chunk_chars

    def _reply(self, received_text: str) -> ScriptedReply:
        control = self.control
        if control.replies:
            return control.replies.popleft()
        settings = control.settings
        if settings.mode == "script":
            for item in control.script:
                if item.match is None or re.search(item.match, received_text):
                    return item
        if settings.mode == "lorem":
            words = [LOREM[i % len(LOREM)] for i in range(settings.reply_words)]
            return ScriptedReply(" ".join(words))
        return ScriptedReply(received_text)

    async def _stream(
        self, request: web.Request, events: Iterator[tuple[str | None, dict[str, Any] | str]],
        fault: Fault | None,
    ) -> web.StreamResponse:  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        control = self.control
        control.open_streams += 1
        delay = control.settings.chunk_delay_ms / 1000
        try:
            for sent, (name, payload) in enumerate(events):
                if fault and fault.die_after is not None and sent >= fault.die_after:
                    _drop(request)
                    return response
                data = payload if isinstance(payload, str) else json.dumps(payload)
                head = f"event: {name}\n" if name else ""
                await response.write(f"{head}data: {data}\n\n".encode())
                if delay:
                    await asyncio.sleep(delay)
        except (asyncio.CancelledError, ConnectionResetError):
            control.cancelled_streams += 1
            raise
        finally:
            control.open_streams -= 1
        control.finished_streams += 1
        await response.write_eof()
        return response


def _drop(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _fault_response(fault: Fault) -> web.Response:
    body = (
        fault.body
        if fault.body is not None
        else {
            "error": {"message": "demo fault", "type": "server_error", "param": None, "code": None}
        }
    )
    if isinstance(body, str | bytes):
        return web.Response(status=fault.status or 500, body=body, headers=fault.headers)
    return web.json_response(body, status=fault.status or 500, headers=fault.headers)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _chat_text(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    return _text_of(messages[-1].get("content")) if messages else ""


def _responses_text(body: dict[str, Any]) -> str:
    given = body.get("input", "")
    if isinstance(given, str):
        return given
    last = given[-1] if isinstance(given, list) and given else {}
    return _text_of(last.get("content")) if isinstance(last, dict) else ""


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _chunks(reply: ScriptedReply, size: int) -> list[str]:
    if reply.chunks is not None:
        return list(reply.chunks)
    text = reply.text
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _tool_call(body: dict[str, Any], text: str) -> dict[str, Any] | None:
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


def _chat_completion(
    body: dict[str, Any], text: str, call: dict[str, Any] | None
) -> dict[str, Any]:
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


def _chat_chunks(
    body: dict[str, Any], reply: ScriptedReply, call: dict[str, Any] | None, size: int
) -> Iterator[tuple[str | None, dict[str, Any] | str]]:
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


def _completion_chunks(
    body: dict[str, Any], reply: ScriptedReply, size: int
) -> Iterator[tuple[str | None, dict[str, Any] | str]]:
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


def _text_completion(body: dict[str, Any], text: str) -> dict[str, Any]:
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


def _response_object(
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


def _response_events(
    body: dict[str, Any], reply: ScriptedReply, size: int
) -> Iterator[tuple[str | None, dict[str, Any] | str]]:
    response_id, item_id = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex
    sequence = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, "sequence_number": next(sequence), **fields}

    pending = _response_object(body, "", "in_progress", response_id=response_id)
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
    done = _response_object(body, text, "completed", response_id=response_id, item_id=item_id)
    yield event("response.completed", response=done)


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [(b - 128) / 128 for b in digest[:EMBEDDING_SIZE]]


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
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


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "demo"}


async def start_demo(host: str, port: int, control: DemoControl | None = None) -> web.AppRunner:
    """Starts the demo provider on `host:port` (0 picks a free port); `cleanup()` stops it."""
    runner = web.AppRunner(
        create_demo_app(control), access_log=None, handler_cancellation=True, shutdown_timeout=1
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a started runner listens on."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the demo provider is not listening")
