"""The offline token estimate: ceil(chars / 4) of text parts, plus per-message overhead."""

import pytest

from gateway.tokens import completion_cap, count_prompt, count_text


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2),
                                              ("x" * 400, 100)])  # fmt: skip
def test_text_is_four_characters_a_token_rounded_up(text, tokens):
    assert count_text(text) == tokens


def test_chat_counts_text_parts_and_message_overhead():
    body = {"messages": [
        {"role": "system", "content": "abcd" * 3},
        {"role": "user", "content": [{"type": "text", "text": "abcd"},
                                     {"type": "image_url", "image_url": {"url": "x" * 999}}]},
    ]}  # fmt: skip
    assert count_prompt("chat.completions", body) == 3 + 1 + 2 * 3 + 3


@pytest.mark.parametrize(("endpoint", "body", "tokens"), [
    ("responses", {"input": "abcdefgh", "instructions": "abcd"}, 3),
    ("responses", {"input": [{"role": "user", "content": "abcd"}]}, 1 + 3),
    ("completions", {"prompt": ["abcd", "abcd"]}, 2),
    ("completions", {"prompt": [1, 2, 3]}, 3),
    ("embeddings", {"input": [[5, 6], "abcdefgh"]}, 4),
    ("models", {}, 0),
])  # fmt: skip
def test_other_endpoints_count_their_inputs(endpoint, body, tokens):
    assert count_prompt(endpoint, body) == tokens


@pytest.mark.parametrize(("endpoint", "body", "cap"), [
    ("chat.completions", {"max_tokens": 50}, 50),
    ("chat.completions", {"max_completion_tokens": 70, "max_tokens": 50}, 70),
    ("responses", {"max_output_tokens": 9}, 9),
    ("completions", {"max_tokens": True}, None),
    ("chat.completions", {}, None),
])  # fmt: skip
def test_completion_cap_reads_the_field_of_each_endpoint(endpoint, body, cap):
    assert completion_cap(endpoint, body) == cap


def _joined(value):
    """The text the estimate counts, built by concatenation: what `_length_of` must measure."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_joined(part) for part in value)
    if not isinstance(value, dict):
        return ""
    parts = [value[k] for k in ("text", "name", "arguments", "output")
             if isinstance(value.get(k), str)]  # fmt: skip
    if value.get("content") is not None:
        parts.append(_joined(value["content"]))
    parts += [_joined(c.get("function")) for c in value.get("tool_calls") or ()
              if isinstance(c, dict)]  # fmt: skip
    return "".join(parts)


@pytest.mark.parametrize("message", [
    "plain", 7, None, ["a", {"type": "text", "text": "bc"}, {"type": "image_url"}],
    {"role": "user", "content": "héllo wörld", "name": "ann"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}, "junk", {}]},
    {"type": "function_call_output", "output": "42", "text": 5, "content": [["x", "yz"]]},
])  # fmt: skip
def test_the_length_of_text_parts_is_that_of_their_concatenation(message):
    from gateway.tokens import _length_of

    assert _length_of(message) == len(_joined(message))
