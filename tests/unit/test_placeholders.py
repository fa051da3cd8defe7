"""Placeholders: values escaped for JSON strings, and restoring them in whole JSON trees."""

from __future__ import annotations

import json
import random

import pytest
from faker import Faker

from gateway.placeholders import json_escaped, restore_tree


def _values() -> list[str]:
    fake = Faker("en_US")
    fake.seed_instance(11)
    rng = random.Random(11)
    plain = [fake.email() for _ in range(5)] + [fake.phone_number() for _ in range(5)]
    odd = [fake.name() + rng.choice(['"', "\\", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "\u2028"])
           + fake.city() for _ in range(40)]  # fmt: skip
    return plain + odd


def test_escaped_values_are_what_json_writes_inside_a_string():
    table = {f"<PERSON_{i}>": value for i, value in enumerate(_values(), 1)}
    escaped = json_escaped(table)
    assert escaped == {k: json.dumps(v, ensure_ascii=False)[1:-1] for k, v in table.items()}


@pytest.mark.parametrize("escaped_given", [True, False])
def test_tree_is_restored_everywhere_and_arguments_stay_valid_json(escaped_given):
    value = 'Ann "Nan" O\\Neil'
    table = {"<PERSON_1>": value, "<EMAIL_ADDRESS_1>": "ann@example.org"}
    tree = {
        "id": "x", "n": 3, "ok": True, "none": None,
        "choices": [{"message": {"content": "Hi <PERSON_1>, <EMAIL_ADDRESS_1>, <PERSON_9>",
                                 "tool_calls": [{"function": {
                                     "arguments": json.dumps({"to": "<PERSON_1>"})}}]}}],
        "list": ["<EMAIL_ADDRESS_1>", ["<PERSON_1>"], 1.5],
    }  # fmt: skip
    if escaped_given:
        restore_tree(tree, table, json_escaped(table))
    else:  # worked out where an `arguments` string needs it
        restore_tree(tree, table)
    message = tree["choices"][0]["message"]
    assert message["content"] == f"Hi {value}, ann@example.org, <PERSON_9>"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"to": value}
    assert tree["list"] == ["ann@example.org", [value], 1.5]
    assert (tree["id"], tree["n"], tree["ok"], tree["none"]) == ("x", 3, True, None)
