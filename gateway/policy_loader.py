"""Reading and validating policy files: every problem names its file and line.

Owns listing `policies/*.yaml` (hidden ConfigMap entries skipped), parsing each file against the
schema with file:line, policy, rule and field in every problem, duplicate-id checks, and the
policy-set hash. Must not compile rules or scan text (`gateway.policies` does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.policy_schema import Policy, RegexRule
from gateway.scanner import check_pattern

SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a policy file cannot be used."""

    file: str
    line: int
    message: str
    policy: str | None = None
    rule: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = [f"policy {self.policy}" if self.policy else "",
                 f"rule {self.rule}" if self.rule else "",
                 f"field {self.field}" if self.field else ""]  # fmt: skip
        named = ", ".join(w for w in where if w)
        return f"{self.file}:{self.line}: " + (f"{named}: " if named else "") + self.message


class PolicyError(Exception):
    """The policy directory cannot be used; `problems` says where and why."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = list(problems)


def policy_files(directory: Path) -> list[Path]:
    """The policy files of `directory`, sorted; hidden entries (ConfigMap `..data`) skipped."""
    return sorted(
        p for p in directory.iterdir()
        if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
    )  # fmt: skip


def read_directory(directory: Path) -> list[tuple[str, str]]:
    """(file name, text) of each policy file; raises PolicyError if the directory is unusable."""
    if not directory.is_dir():
        raise PolicyError([Problem(str(directory), 0, "is not a directory")])
    return [(str(path), path.read_text(encoding="utf-8")) for path in policy_files(directory)]


def parse_policy(name: str, text: str) -> tuple[Policy | None, list[Problem]]:
    """Validates one file's text, with line numbers for every problem."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        return None, [Problem(name, line, f"not valid YAML: {getattr(exc, 'problem', exc)}")]
    if not isinstance(data, dict) or node is None:
        return None, [Problem(name, 1, "a policy file must be a mapping")]
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        return None, [_problem(name, node, data, error) for error in exc.errors()]
    return policy, _pattern_problems(name, node, policy)


def _problem(name: str, node: yaml.Node, data: dict[str, Any], error: Any) -> Problem:
    loc = tuple(error["loc"])
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc += ("kind",)
    rule = None
    if len(loc) > 1 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = data.get("rules")
        if isinstance(rules, list) and loc[1] < len(rules) and isinstance(rules[loc[1]], dict):
            rule = str(rules[loc[1]].get("id") or f"#{loc[1] + 1}")
    if rule is not None and len(loc) > 2 and loc[2] in _KINDS:
        loc = loc[:2] + loc[3:]  # the union's tag is not a key of the file
    inner = loc[2:] if rule is not None else loc
    fields = [str(p) for p in inner if isinstance(p, str) and p not in _KINDS]
    policy = data.get("id") if isinstance(data.get("id"), str) else None
    return Problem(name, line_of(node, loc), error["msg"], policy, rule,
                   ".".join(fields) or None)  # fmt: skip


_KINDS = {"regex", "words", "entities", "max_length", "injection", "canary", "request"}


def line_of(node: yaml.Node, loc: Sequence[Any]) -> int:
    """The line of the deepest YAML node along `loc` (keys absent from the file are skipped)."""
    line = node.start_mark.line + 1
    for part in loc:
        child = _child(node, part)
        if child is None:
            continue
        key_line, node = child
        line = key_line
    return line


def _child(node: yaml.Node, part: Any) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if key.value == part:
                return key.start_mark.line + 1, value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item = node.value[part]
        return item.start_mark.line + 1, item
    return None


def _pattern_problems(name: str, node: yaml.Node, policy: Policy) -> list[Problem]:
    problems = []
    for index, rule in enumerate(policy.rules):
        if isinstance(rule, RegexRule):
            reason = check_pattern(rule.pattern)
            if reason:
                line = line_of(node, ("rules", index, "pattern"))
                problems.append(Problem(name, line, f"RE2 cannot run this pattern: {reason}",
                                        policy.id, rule.id, "pattern"))  # fmt: skip
    return problems


def check_files(files: Sequence[tuple[str, str]]) -> tuple[list[Policy], list[Problem]]:
    """Validates every file and the set as a whole (duplicate policy ids)."""
    policies: list[Policy] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for name, text in files:
        policy, found = parse_policy(name, text)
        problems.extend(found)
        if policy is None or found:
            continue
        if policy.id in seen:
            message = f"duplicate policy id (also in {seen[policy.id]})"
            problems.append(Problem(name, _id_line(text), message, policy.id, field="id"))
            continue
        seen[policy.id] = name
        policies.append(policy)
    return policies, problems


def _id_line(text: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("id:"):
            return number
    return 1


def policy_set_hash(files: Iterable[tuple[str, str]]) -> str:
    """sha256 over every file's base name and content: any edit changes it."""
    digest = hashlib.sha256()
    for name, text in sorted((Path(n).name, t) for n, t in files):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return "sha256:" + digest.hexdigest()[:16]
