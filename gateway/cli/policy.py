"""`gateway policy lint|test|explain|schema`: policy files checked and tested like code.

Owns turning a policy directory into lint problems (file:line), running each file's `tests:`
cases, explaining which rules match a text and why, and writing the JSON Schema. Must not hold
matching logic: `PolicySet` does that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import string
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.policies import (
    Finding,
    PolicyError,
    PolicySet,
    TextDirection,
    check_files,
    line_of,
    load_policies,
    read_directory,
)
from gateway.policy_schema import EntitiesRule, Policy, PolicyTest, policy_json_schema
from gateway.stream_matcher import Release

DEFAULT_DIR = Path("policies")
SCHEMA_FILE = DEFAULT_DIR / "schema.json"
CANARY_PLACEHOLDER = "{canary}"  # in a test's text, stands for this request's canary marker
_TEST_CANARY = "cnry-0000000000000000"
_FAKE = re.compile(r"\{fake:([a-z_]+)\}")
_ALNUM = string.ascii_letters + string.digits


def fake_values(seed: int = 1) -> dict[str, str]:
    """Credential-shaped test values, built at run time so no file in the tree holds one."""
    rng = random.Random(seed)  # noqa: S311 - test data, not a secret

    def pick(chars: str, count: int) -> str:
        return "".join(rng.choice(chars) for _ in range(count))

    upper = string.ascii_uppercase + string.digits
    return {
        "aws_access_key_id": "AK" + "IA" + pick(upper, 16),
        "github_token": "gh" + "p_" + pick(_ALNUM, 36),
        "slack_token": "xo" + "xb-" + pick(string.digits, 11) + "-" + pick(_ALNUM, 24),
        "api_key": "sk" + "-proj-" + pick(_ALNUM, 40),
        "private_key": "-----BEGIN " + "PRIVATE" + " KEY-----\n" + pick(_ALNUM, 64),
        "url_password": "postgres://app:" + pick(_ALNUM, 12) + "@",
    }


def expand(text: str, fakes: dict[str, str]) -> str:
    """Fills `{fake:KIND}` and `{canary}` placeholders of a test case."""
    text = text.replace(CANARY_PLACEHOLDER, _TEST_CANARY)
    return _FAKE.sub(lambda m: fakes.get(m.group(1), m.group(0)), text)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser("policy", help="lint, test and explain policy files")
    sub = policy.add_subparsers(dest="policy_command", required=True)
    lint = sub.add_parser("lint", help="validate every policy file (errors name file:line)")
    lint.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    lint.set_defaults(run=run_lint)
    test = sub.add_parser("test", help="run each policy file's tests; non-zero on failure")
    test.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    test.set_defaults(run=run_test)
    explain = sub.add_parser("explain", help="show which rules match a text and why")
    explain.add_argument("--text", required=True, help="the prompt or completion text")
    explain.add_argument("--direction", choices=["prompt", "completion"], default="prompt")
    explain.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    explain.set_defaults(run=run_explain)
    schema = sub.add_parser("schema", help="write the JSON Schema of policy files")
    schema.add_argument("--output", type=Path, default=SCHEMA_FILE)
    schema.add_argument("--check", action="store_true", help="fail if the file is out of date")
    schema.set_defaults(run=run_schema)


def _checked(directory: Path) -> tuple[list[tuple[str, str]], list[Policy]] | None:
    """The directory's files and policies, or None after printing every problem (file:line)."""
    try:
        files = read_directory(directory)
    except (PolicyError, OSError) as error:
        print(f"{directory}: {error}", file=sys.stderr)
        return None
    policies, problems = check_files(files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {directory}", file=sys.stderr)
        return None
    return files, policies


def run_lint(args: argparse.Namespace) -> int:
    checked = _checked(args.directory)
    if checked is None:
        return 1
    loaded = load_policies(args.directory)
    print(f"{args.directory}: {len(checked[1])} policies, {loaded.rule_count} rules, ok "
          f"({loaded.hash})")  # fmt: skip
    return 0


def run_test(args: argparse.Namespace) -> int:
    checked = _checked(args.directory)
    if checked is None:
        return 1
    files, policies = checked
    failures = asyncio.run(_run_tests(files, policies))
    for failure in failures:
        print(failure, file=sys.stderr)
    total = sum(len(p.tests) for p in policies)
    print(f"{total - len(failures)}/{total} policy tests passed")
    return 1 if failures else 0


async def _run_tests(files: list[tuple[str, str]], policies: list[Policy]) -> list[str]:
    names = {_policy_id(text): (name, text) for name, text in files}
    failures = []
    fakes = fake_values()
    finder = await _finder_if_needed(policies)
    try:
        for policy in policies:
            name, text = names[policy.id]
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            alone = PolicySet((policy.model_copy(update={"mode": "enforce"}),), "test")
            selection = alone.select_all()
            for index, case in enumerate(policy.tests):
                text = expand(case.text, fakes)
                release = await alone.evaluate(
                    selection, text, case.direction, canary=_TEST_CANARY, finder=finder
                )
                problem = check_case(case, release)
                if problem:
                    line = line_of(node, ("tests", index)) if node is not None else 1
                    label = case.name or case.text[:40]
                    failures.append(f"{name}:{line}: policy {policy.id} test {label!r}: {problem}")
    finally:
        if finder is not None:
            await finder.close()
    return failures


def check_case(case: PolicyTest, release: Release[Finding]) -> str | None:
    """Why `release` is not what `case` expects, or None when it is."""
    decided = outcome(release)
    rules = {f.rule.id for f in release.matches}
    if release.blocked is not None:
        rules.add(release.blocked.rule.id)
    if decided != case.expect:
        return f"expected {case.expect}, got {decided} (rules: {', '.join(sorted(rules)) or '-'})"
    if case.rule is not None and case.rule not in rules:
        return f"expected rule {case.rule} to decide, got {', '.join(sorted(rules)) or '-'}"
    if case.output is not None and release.text != case.output:
        return f"expected output {case.output!r}, got {release.text!r}"
    return None


def outcome(release: Release[Finding]) -> str:
    """The strongest action taken: block, redact, flag or pass."""
    if release.blocked is not None:
        return "block"
    actions = {f.rule.action for f in release.matches}
    for action in ("block", "redact", "flag"):
        if action in actions:
            return "flag" if action == "block" else action  # a block that did not block: shadow
    return "pass"


def run_explain(args: argparse.Namespace) -> int:
    try:
        policies = load_policies(args.directory)
    except PolicyError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 1
    release, findings = asyncio.run(_explain(policies, args.text, args.direction))
    print(f"policy set {policies.hash} ({policies.source}), direction {args.direction}")
    for finding in findings:
        print(_describe(finding, args.text))
    if not findings:
        print("no rule matches")
    print(f"decision: {outcome(release)}")
    if release.blocked is None and release.text != args.text:
        print(f"text after redaction: {release.text}")
    return 0


async def _explain(
    policies: PolicySet, text: str, direction: TextDirection
) -> tuple[Release[Finding], list[Finding]]:
    finder = await _finder_if_needed(policies.policies)
    try:
        selection = policies.select_all()
        scanned = await policies.scan(selection, text, direction, finder=finder)
        release = await policies.evaluate(selection, text, direction, finder=finder)
    finally:
        if finder is not None:
            await finder.close()
    findings = list(scanned.matches)
    if direction == "completion":
        findings += policies.length_findings(selection, len(text))
    return release, sorted(findings, key=lambda f: (f.start, f.policy.id, f.rule.id))


def _describe(finding: Finding, text: str) -> str:
    policy, rule = finding.policy, finding.rule
    excerpt = text[finding.start : finding.end]
    if len(excerpt) > 60:
        excerpt = excerpt[:57] + "..."
    why = f" [{finding.detail}]" if finding.detail else ""
    where = f"at {finding.start}-{finding.end} {excerpt!r}{why}"
    return (
        f"- {policy.id}@{policy.version} ({policy.mode}) rule {rule.id} ({rule.kind}): "
        f"{rule.action}/{rule.severity} {where}"
    )


def run_schema(args: argparse.Namespace) -> int:
    text = json.dumps(policy_json_schema(), indent=2, sort_keys=True) + "\n"
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run `gateway policy schema`", file=sys.stderr)
            return 1
        print(f"{args.output}: up to date")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


def _policy_id(text: str) -> str:
    data: Any = yaml.safe_load(text)
    return str(data.get("id")) if isinstance(data, dict) else ""


async def _finder_if_needed(policies: Any) -> Any:
    """The redaction engine, started only when some policy has entity rules."""
    if not any(isinstance(r, EntitiesRule) for p in policies for r in p.rules):
        return None
    from gateway.config import RedactionSettings
    from gateway.redactor import Redactor
    from gateway.stages.enforce_policy import AnalyzerFinder

    redactor = Redactor(RedactionSettings(enabled=True, workers=1))
    await redactor.open()
    return _ClosingFinder(AnalyzerFinder(redactor), redactor)


class _ClosingFinder:
    def __init__(self, finder: Any, redactor: Any) -> None:
        self._finder, self._redactor = finder, redactor

    async def find_entities(self, text: str, entities: frozenset[str]) -> Any:
        return await self._finder.find_entities(text, entities)

    async def close(self) -> None:
        await self._redactor.close()
