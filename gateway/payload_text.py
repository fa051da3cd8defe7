"""Where text lives in OpenAI request and response payloads, as slots that can be read and set.

Owns finding every client text of a request (chat messages and parts, tool arguments and
results, responses `instructions`/`input`, completion prompts, embedding inputs), every model
text of a non-stream answer, image parts and tool names. Must not decide anything about the
text: stages do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

IMAGE_PARTS = frozenset({"image_url", "input_image"})
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


@dataclass(slots=True)  # not frozen: measured, a frozen one costs ~3.8k instructions more to
class TextSlot:  # build (object.__setattr__ per field), and every text of every request has one
    """`container[key]` holds a string; `owner` is the choice (or response) it belongs to."""

    container: Any
    key: str | int
    owner: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return str(self.container[self.key])

    def set(self, text: str) -> None:
        self.container[self.key] = text


def prompt_slots(endpoint: str, body: dict[str, Any]) -> list[TextSlot]:
    """Every text of the request that reaches the provider."""
    if endpoint == "chat.completions":
        return _chat_prompt(body.get("messages"))
    if endpoint == "responses":
        slots = (
            [TextSlot(body, "instructions")] if isinstance(body.get("instructions"), str) else []
        )
        return slots + list(_strings_or_items(body, "input"))
    if endpoint in ("completions", "embeddings"):
        key = "prompt" if endpoint == "completions" else "input"
        return list(_strings_or_items(body, key))
    return []


def _chat_prompt(messages: Any) -> list[TextSlot]:
    slots: list[TextSlot] = []
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("content"), str):  # the usual message: no parts to walk
            slots.append(TextSlot(message, "content"))
        else:
            slots += _content(message, "content")
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                slots.append(TextSlot(function, "arguments"))
    return slots


def _strings_or_items(body: dict[str, Any], key: str) -> Iterator[TextSlot]:
    value = body.get(key)
    if isinstance(value, str):
        yield TextSlot(body, key)
        return
    for index, item in enumerate(value if isinstance(value, list) else ()):
        if isinstance(item, str):
            yield TextSlot(value, index)
        elif isinstance(item, dict):
            yield from _content(item, "content")
            for name in ("output", "arguments"):
                if isinstance(item.get(name), str):
                    yield TextSlot(item, name)


def _content(holder: dict[str, Any], key: str) -> Iterator[TextSlot]:
    content = holder.get(key)
    if isinstance(content, str):
        yield TextSlot(holder, key)
        return
    for part in content if isinstance(content, list) else ():
        is_text = isinstance(part, dict) and part.get("type") in _TEXT_PARTS
        if is_text and isinstance(part.get("text"), str):
            yield TextSlot(part, "text")


def completion_slots(endpoint: str, body: dict[str, Any]) -> list[TextSlot]:
    """Every model text of a non-stream answer, each with the choice or response it is in."""
    slots: list[TextSlot] = []
    if endpoint == "responses":
        for item in body.get("output") or ():
            if isinstance(item, dict):
                slots += [TextSlot(s.container, s.key, body) for s in _content(item, "content")]
        return slots
    for choice in body.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        holder = choice.get("message") if endpoint == "chat.completions" else choice
        key = "content" if endpoint == "chat.completions" else "text"
        if isinstance(holder, dict) and isinstance(holder.get(key), str):
            slots.append(TextSlot(holder, key, choice))
    return slots


def mark_filtered(endpoint: str, owner: dict[str, Any], reason: str = "content_filter") -> None:
    """Marks a choice (or a response) as cut short by the content filter."""
    if endpoint == "responses":
        owner["status"] = "incomplete"
        owner["incomplete_details"] = {"reason": reason}
    else:
        owner["finish_reason"] = reason


def image_parts(endpoint: str, body: dict[str, Any]) -> list[tuple[list[Any], dict[str, Any]]]:
    """(list, part) of every image input, so a caller can see or remove them."""
    found: list[tuple[list[Any], dict[str, Any]]] = []
    items = body.get("messages") if endpoint == "chat.completions" else body.get("input")
    for item in items if isinstance(items, list) else ():
        content = item.get("content") if isinstance(item, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                found.append((content, part))
    return found


def tool_name(tool: Any) -> str:
    """A tool's function name (chat nests it; responses does not; built-ins have a type only)."""
    if not isinstance(tool, dict):
        return ""
    function = tool.get("function")
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return str(function["name"])
    return str(tool.get("name") or tool.get("type") or "")
