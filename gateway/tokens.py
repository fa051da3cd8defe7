"""Offline token counting: a documented estimate of how many tokens a prompt or a text is.

Owns the estimate the rate limiter reserves before a call and charges when a provider reports
no usage. It is a heuristic, not a tokenizer: about four characters of English per token
(OpenAI's published rule of thumb), rounded up, plus a small fixed overhead per chat message
for the role and separators (OpenAI's cookbook counts 3 per message and 3 for the reply
priming). Only text parts count: images, audio and files are not estimated. Must not download
anything, do I/O or call the network.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
PER_MESSAGE = 3
REPLY_PRIMING = 3
CAP_FIELDS = {
    "chat.completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}


def count_text(text: str) -> int:
    """Tokens in `text`: ceil(characters / 4)."""
    return _count_chars(len(text))


def count_prompt(endpoint: str, body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a request body for `endpoint` (0 for unknown endpoints)."""
    if endpoint == "chat.completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        texts = 0
        for message in messages:  # (a loop: a generator costs more than one message's count)
            if isinstance(message, dict):
                texts += _count_chars(_fields_length(message))
        return texts + PER_MESSAGE * len(messages) + REPLY_PRIMING
    if endpoint == "responses":
        return _count_chars(_length_of(body.get("instructions"))) + _count_input(body.get("input"))
    if endpoint in ("completions", "embeddings"):
        field = "prompt" if endpoint == "completions" else "input"
        return _count_input(body.get(field))
    return 0


def completion_cap(endpoint: str, body: dict[str, Any]) -> int | None:
    """The client's own completion-token maximum, if it set one."""
    for name in CAP_FIELDS.get(endpoint, ()):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _count_input(value: Any) -> int:
    if isinstance(value, str):
        return count_text(value)
    if isinstance(value, list):
        return sum(_count_input_item(item) for item in value)
    return 0


def _count_input_item(item: Any) -> int:
    if isinstance(item, str):
        return count_text(item)
    if isinstance(item, int):
        return 1  # a pre-tokenized prompt: one token per id
    if isinstance(item, list):
        return len(item) if all(isinstance(t, int) for t in item) else _count_input(item)
    if isinstance(item, dict):
        return _count_chars(_length_of(item)) + PER_MESSAGE
    return 0


def _count_chars(chars: int) -> int:
    """`count_text` of a text of `chars` characters."""
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _length_of(value: Any) -> int:
    """Characters in the text parts of a message, content part list, or string: the length
    of their concatenation, counted without building it."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_length_of(part) for part in value)
    if not isinstance(value, dict):
        return 0
    return _fields_length(value)


def _fields_length(value: dict[str, Any]) -> int:
    """`_length_of` a dict: its text fields, content and tool call functions. One pass over
    its items (most messages have two) rather than a look-up of each field it may have."""
    length = 0
    for key, part in value.items():
        if key == "content":
            if part is not None:
                length += len(part) if isinstance(part, str) else _length_of(part)
        elif key in _TEXT_FIELDS:
            if isinstance(part, str):
                length += len(part)
        elif key == "tool_calls":
            for call in part or ():
                if isinstance(call, dict):
                    length += _length_of(call.get("function"))
    return length


_TEXT_FIELDS = frozenset(("text", "name", "arguments", "output"))
