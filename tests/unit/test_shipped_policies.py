"""Every shipped policy file loads, its own tests pass, and policies/schema.json is current."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

from gateway.cli.policy import _TEST_CANARY, check_case, expand, fake_values
from gateway.policies import PolicySet, load_policies, read_directory
from gateway.policy_schema import policy_json_schema

SHIPPED = Path(__file__).resolve().parents[2] / "policies"
POLICIES = load_policies(SHIPPED)
CASES = [(p, i) for p in POLICIES.policies for i in range(len(p.tests))]


def test_every_shipped_file_loads_and_has_tests():
    names = {Path(name).name for name, _ in read_directory(SHIPPED)}
    assert {"pii.yaml", "secrets.yaml", "prompt_injection.yaml", "output_safety.yaml"} <= names
    assert all(policy.tests for policy in POLICIES.policies)


@pytest.mark.parametrize(("policy", "index"), CASES, ids=[f"{p.id}-{i}" for p, i in CASES])
async def test_shipped_policy_case(policy, index):
    case = policy.tests[index]
    alone = PolicySet((policy,), "test")
    text = expand(case.text, fake_values())
    release = await alone.evaluate(alone.select_all(), text, case.direction, canary=_TEST_CANARY)
    assert check_case(case, release) is None


def test_schema_file_is_up_to_date():
    shipped = json.loads((SHIPPED / "schema.json").read_text())
    assert shipped == policy_json_schema(), "run `gateway policy schema`"


def generated_secrets(seed: int) -> list[str]:
    """Fresh credential-shaped values per seed (never written to the tree)."""
    rng = random.Random(seed)
    alnum = string.ascii_letters + string.digits
    pick = lambda chars, n: "".join(rng.choice(chars) for _ in range(n))  # noqa: E731
    return [
        "AS" + "IA" + pick(string.ascii_uppercase + string.digits, 16),
        "gh" + "o_" + pick(alnum, 36),
        "github_" + "pat_" + pick(alnum + "_", 82),
        "xo" + "xp-" + pick(alnum, 30),
        "sk-" + "ant-" + pick(alnum, 48),
    ]


@pytest.mark.parametrize("seed", range(5))
async def test_generated_credentials_are_replaced_in_prompts_and_block_completions(seed):
    selection = POLICIES.select_all()
    for value in generated_secrets(seed):
        prompt = await POLICIES.evaluate(selection, f"here: {value} thanks", "prompt")
        assert value not in prompt.text and prompt.matches, value
        answer = await POLICIES.evaluate(selection, f"the key is {value}.", "completion")
        assert answer.blocked is not None and answer.blocked.rule.id == "credential-in-completion"
