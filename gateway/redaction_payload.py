"""Where the redactor reads client text in OpenAI requests, as slots it can rewrite.

Owns finding every piece of client text a provider would receive (chat messages: content,
text and refusal parts, names, tool call arguments; responses `instructions` and `input` items
with tool results; completion prompts; embedding inputs), each named by its path for error
messages, with JSON tool arguments split into their string leaves and written back after
rewriting. Refuses what cannot be checked (token ids; media parts when the rules say so).
Must not detect or decide anything about the text (the `RedactPrompt` stage does) nor log it.
`gateway.payload_text` serves the policy stage with a different, coarser walk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ContentPolicyError, InvalidRequestError
from gateway.redaction_rules import RedactionRules

NON_TEXT_PARTS = {"image_url", "input_image", "input_audio", "input_file", "file"}
_CONTAINERS = (dict, list)


@dataclass(slots=True)
class Slot:
    """Where one text lives: `container[key]`; `where` names it in errors (never the value);
    `text` is what it held when collected."""

    container: Any
    key: str | int
    where: str
    text: str

    def set(self, text: str) -> None:
        self.container[self.key] = text


@dataclass(slots=True)
class Collected:
    """The text slots of a request and the JSON strings (tool arguments) they were parsed from."""

    slots: list[Slot] = field(default_factory=list)
    json_fields: list[tuple[Any, str | int, Any]] = field(default_factory=list)

    def write_json_fields(self) -> None:
        """Serializes the parsed JSON fields back into their strings, after slots were set."""
        for container, key, parsed in self.json_fields:
            container[key] = json.dumps(parsed, ensure_ascii=False)


def collect_texts(endpoint: str, body: dict[str, Any], rules: RedactionRules) -> Collected:
    """Every client text the provider would receive, as editable slots."""
    found = Collected()
    if endpoint == "chat.completions":
        for index, message in enumerate(_list(body.get("messages"))):
            _message(found, message, f"messages[{index}]", rules)
    elif endpoint == "responses":
        _string(found, body, "instructions", "instructions")
        _responses_input(found, body, rules)
    elif endpoint in ("completions", "embeddings"):
        name = "prompt" if endpoint == "completions" else "input"
        _prompt(found, body, name)
    return found


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _string(found: Collected, container: Any, key: str | int, where: str) -> bool:
    """Collects `container[key]` if it is a string; says whether it was."""
    if isinstance(container, _CONTAINERS) and isinstance(text := _get(container, key), str):
        found.slots.append(Slot(container, key, where, text))
        return True
    return False


def _get(container: Any, key: str | int) -> Any:
    if isinstance(container, dict):
        return container.get(key)
    return container[key] if isinstance(key, int) and 0 <= key < len(container) else None


def _message(found: Collected, message: Any, where: str, rules: RedactionRules) -> None:
    if not isinstance(message, dict):
        return
    _content(found, message, "content", f"{where}.content", rules)
    for key in ("name", "refusal"):
        if isinstance(text := message.get(key), str):  # names are built only for what is there
            found.slots.append(Slot(message, key, f"{where}.{key}", text))
    for index, call in enumerate(_list(message.get("tool_calls"))):
        if isinstance(call, dict):
            _arguments(found, call.get("function"), f"{where}.tool_calls[{index}].function")
    if "function_call" in message:
        _arguments(found, message["function_call"], f"{where}.function_call")


def _content(found: Collected, holder: Any, key: str, where: str, rules: RedactionRules) -> None:
    if _string(found, holder, key, where):
        return
    for index, part in enumerate(_list(holder.get(key))):
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in NON_TEXT_PARTS and rules.images == "refuse":
            raise ContentPolicyError(
                f"{where}[{index}] is a {kind} part; this gateway only forwards text it can "
                "check for personal data. Send text only.",
                param=f"{where}[{index}]",
            )
        for text_key in ("text", "refusal"):
            _string(found, part, text_key, f"{where}[{index}].{text_key}")


def _arguments(found: Collected, function: Any, where: str) -> None:
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return
    arguments = function["arguments"]
    try:
        parsed = json.loads(arguments)
    except ValueError:
        found.slots.append(Slot(function, "arguments", f"{where}.arguments", arguments))
        return
    found.json_fields.append((function, "arguments", parsed))
    _json_leaves(found, parsed, f"{where}.arguments")


def _json_leaves(found: Collected, node: Any, where: str) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) \
        else ()  # fmt: skip
    for key, value in items:
        if isinstance(value, str):
            found.slots.append(Slot(node, key, where, value))
        else:
            _json_leaves(found, value, where)


def _responses_input(found: Collected, body: dict[str, Any], rules: RedactionRules) -> None:
    if _string(found, body, "input", "input"):
        return
    for index, item in enumerate(_list(body.get("input"))):
        if not isinstance(item, dict):
            continue
        where = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            _content(found, item, "content", f"{where}.content", rules)
        elif kind == "function_call":
            _arguments(found, item, where)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            _content(found, item, "output", f"{where}.output", rules)


def _prompt(found: Collected, body: dict[str, Any], name: str) -> None:
    if _string(found, body, name, name):
        return
    value = body.get(name)
    for index, item in enumerate(_list(value)):
        if not isinstance(item, str):
            raise InvalidRequestError(
                f"'{name}' holds token ids, which this gateway cannot check for personal "
                "data. Send text instead.",
                param=name,
            )
        found.slots.append(Slot(value, index, f"{name}[{index}]", item))
