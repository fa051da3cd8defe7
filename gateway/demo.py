"""The built-in OpenAI-compatible demo provider: a small aiohttp server that answers like one.

Owns the app and its handlers for chat completions, responses, completions, embeddings and
models (the JSON and SSE shapes are built by `gateway.demo_wire`), streamed or not, with echo /
lorem / scripted replies, chunk sizes and latency, and a `DemoControl` through which tests
script faults and read what was received. Must not be used
for real traffic and must not import anything from the gateway's request path.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from multidict import CIMultiDict

from gateway import demo_wire as wire
from gateway.config import DemoSettings
from gateway.demo_wire import Events, ScriptedReply

_LOREM_TEXT = (
    "the gateway forwards each request to the model provider and returns the answer "
    "while it keeps secrets and personal data away from places they should not go"
)
LOREM = tuple(_LOREM_TEXT.split(" "))


@dataclass(slots=True)
class Fault:
    """A scripted misbehaviour for the next request.

    status: answer with this status and `body`; die_after: send this many stream chunks then
    drop the connection; hang: never answer; stall_body: send the headers and half of a
    non-stream answer, then nothing more; delay: seconds to wait before answering.
    """

    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    die_after: int | None = None
    hang: bool = False
    stall_body: bool = False
    delay: float = 0.0


@dataclass(slots=True)
class Received:
    path: str
    headers: CIMultiDict[str]
    body: Any


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


async def _answer(
    request: web.Request, payload: dict[str, Any], fault: Fault | None
) -> web.StreamResponse:
    """A non-stream answer; with `stall_body`, its first half only, then silence."""
    if fault is None or not fault.stall_body:
        return web.json_response(payload)
    raw = json.dumps(payload).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(raw)
    await response.prepare(request)
    await response.write(raw[: len(raw) // 2])
    await asyncio.sleep(3600)
    return response


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
        call = wire.tool_call(body, reply.text)
        if body.get("stream"):
            events = wire.chat_chunks(body, reply, call, self._size(body))
            return await self._stream(request, events, fault)
        return await _answer(request, wire.chat_completion(body, reply.text, call), fault)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault and fault.status:
            return _fault_response(fault)
        reply = self._reply(_responses_text(body))
        if body.get("stream"):
            events = wire.response_events(body, reply, self._size(body))
            return await self._stream(request, events, fault)
        return await _answer(request, wire.response_object(body, reply.text, "completed"), fault)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault and fault.status:
            return _fault_response(fault)
        prompt = body.get("prompt", "")
        reply = self._reply(prompt if isinstance(prompt, str) else " ".join(map(str, prompt)))
        if body.get("stream"):
            events = wire.completion_chunks(body, reply, self._size(body))
            return await self._stream(request, events, fault)
        return await _answer(request, wire.text_completion(body, reply.text), fault)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault and fault.status:
            return _fault_response(fault)
        return await _answer(request, wire.embeddings(body), fault)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [wire.model_object("demo")]})

    async def model(self, request: web.Request) -> web.Response:
        return web.json_response(wire.model_object(request.match_info["model"]))

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
        self, request: web.Request, events: Events,
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
