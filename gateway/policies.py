"""The policy set: loading a directory of policy files, compiling their rules, and scanning text.

Owns reading and validating `policies/*.yaml` (errors name file:line, policy, rule and field),
compiling every text rule at load into one pass per direction, the policy-set hash, choosing
the policies that apply to a request, and finding matches in prompts and completions. Must not
edit OpenAI payloads (the `EnforcePolicy` stage does) nor import the redaction engine: entity
rules ask an `EntityFinder`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import ValidationError

from gateway.exchange import PolicyDecision, Principal
from gateway.policy_schema import (
    CanaryRule,
    EntitiesRule,
    InjectionRule,
    MaxLengthRule,
    Policy,
    RegexRule,
    RequestRule,
    WordsRule,
)
from gateway.redaction_rules import RedactionRules
from gateway.scanner import (
    InjectionSignals,
    RuleKey,
    TextPattern,
    TextScanner,
    check_pattern,
    compile_injection,
    injection_score,
    pattern_width,
    words_pattern,
    words_width,
)
from gateway.stream_matcher import Effect, Release, Scanned, settle

TextDirection = Literal["prompt", "completion"]
DIRECTIONS: tuple[TextDirection, ...] = ("prompt", "completion")
SUFFIXES = (".yaml", ".yml")
_SELECTIONS = 1024


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


@dataclass(frozen=True, slots=True)
class EntityHit:
    entity_type: str
    start: int
    end: int
    score: float


class EntityFinder(Protocol):
    """The redaction engine's analyzer, as entity rules need it."""

    async def find_entities(self, text: str, entities: frozenset[str]) -> Sequence[EntityHit]: ...


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule that matched a span of text (the whole text for injection and length rules)."""

    policy: Policy
    rule: Any
    start: int
    end: int
    final: bool = True
    detail: str = ""

    @property
    def enforced(self) -> bool:
        return self.policy.mode == "enforce"

    @property
    def effect(self) -> Effect:
        if not self.enforced or self.rule.action == "flag":
            return "pass"
        return "block" if self.rule.action == "block" else "redact"

    @property
    def replacement(self) -> str:
        return str(getattr(self.rule, "replacement", ""))

    def decision(self, direction: str, policy_set_hash: str) -> PolicyDecision:
        return PolicyDecision(
            policy_id=self.policy.id, policy_version=self.policy.version, rule_id=self.rule.id,
            action=self.rule.action, severity=self.rule.severity, mode=self.policy.mode,
            direction=direction, policy_set_hash=policy_set_hash,
        )  # fmt: skip


# --- loading -------------------------------------------------------------------------------


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


def load_policies(
    directory: Path, *, hold_cap: int = 256, entities_available: bool = True
) -> PolicySet:
    """Reads, validates and compiles a directory. Raises PolicyError listing every problem."""
    try:
        files = read_directory(directory)
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([Problem(str(directory), 0, f"cannot read: {exc}")]) from exc
    policies, problems = check_files(files)
    if not problems and not entities_available:
        problems = _entity_problems(policies)
    if problems:
        raise PolicyError(problems)
    return PolicySet(tuple(policies), policy_set_hash(files), str(directory), hold_cap=hold_cap)


def _entity_problems(policies: Sequence[Policy]) -> list[Problem]:
    return [
        Problem(f"policy {p.id}", 0, "entity rules need the redaction engine "
                "(set redaction.enabled: true)", p.id, rule.id, "entities")
        for p in policies for rule in p.rules if isinstance(rule, EntitiesRule)
    ]  # fmt: skip


def policy_set_hash(files: Iterable[tuple[str, str]]) -> str:
    """sha256 over every file's base name and content: any edit changes it."""
    digest = hashlib.sha256()
    for name, text in sorted((Path(n).name, t) for n, t in files):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return "sha256:" + digest.hexdigest()[:16]


# --- the compiled set ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """The policies that apply to one request."""

    ids: frozenset[str]
    holds: dict[str, int] = field(default_factory=dict)

    def hold(self, direction: str) -> int:
        return self.holds.get(direction, 1)


class PolicySet:
    """Immutable, compiled policies; a reload builds a new one and swaps it in whole."""

    def __init__(
        self, policies: tuple[Policy, ...], digest: str, source: str = "", *, hold_cap: int = 256
    ) -> None:
        self.policies = policies
        self.hash = digest
        self.source = source
        self._by_id = {p.id: p for p in policies}
        self._rules: dict[RuleKey, tuple[Policy, Any]] = {
            (p.id, r.id): (p, r) for p in policies for r in p.rules
        }
        self._kinds: dict[type, list[tuple[Policy, Any]]] = {}
        for policy, rule in self._rules.values():
            self._kinds.setdefault(type(rule), []).append((policy, rule))
        self._widths: dict[RuleKey, int] = {}
        self._scanners = {d: self._compile(d, hold_cap) for d in DIRECTIONS}
        self._injection = {(p.id, r.id): _signals(r) for p, r in self._of(InjectionRule)}
        self._selections: dict[tuple[Any, ...], Selection] = {}

    @property
    def rule_count(self) -> int:
        return len(self._rules)

    def policy(self, policy_id: str) -> Policy:
        return self._by_id[policy_id]

    def _of(self, kind: type) -> list[tuple[Policy, Any]]:
        return self._kinds.get(kind, [])

    def _compile(self, direction: str, hold_cap: int) -> TextScanner:
        patterns = []
        for (policy_id, rule_id), (_, rule) in self._rules.items():
            if not isinstance(rule, RegexRule | WordsRule) or not _covers(rule, direction):
                continue
            item = _text_pattern((policy_id, rule_id), rule, hold_cap)
            self._widths[item.key] = item.width
            patterns.append(item)
        return TextScanner(patterns)

    def select(
        self, tenant: str | None, roles: tuple[str, ...], model: str, endpoint: str
    ) -> Selection:
        """The policies whose `applies_to` covers this request (cached per distinct scope)."""
        key = (tenant, roles, model, endpoint)
        selection = self._selections.get(key)
        if selection is None:
            if len(self._selections) >= _SELECTIONS:
                self._selections.clear()
            selection = self._selections[key] = self._select(*key)
        return selection

    def _select(
        self, tenant: str | None, roles: tuple[str, ...], model: str, endpoint: str
    ) -> Selection:
        ids = frozenset(p.id for p in self.policies
                        if _applies(p, tenant, roles, model, endpoint))  # fmt: skip
        holds: dict[str, int] = {d: self._hold(ids, d) for d in DIRECTIONS}
        return Selection(ids, holds)

    def select_all(self) -> Selection:
        """Every policy, whatever its scope (for tests and `policy explain`)."""
        ids = frozenset(self._by_id)
        return Selection(ids, {d: self._hold(ids, d) for d in DIRECTIONS})

    def select_for(self, principal: Principal | None, model: str, endpoint: str) -> Selection:
        tenant = principal.tenant if principal else None
        roles = principal.roles if principal else ()
        return self.select(tenant, roles, model, endpoint)

    def _hold(self, ids: frozenset[str], direction: str) -> int:
        widths = [w for key, w in self._widths.items()
                  if key[0] in ids and _covers(self._rules[key][1], direction)]  # fmt: skip
        widths += [r.max_match_chars for p, r in self._of(EntitiesRule)
                   if p.id in ids and _covers(r, direction)]  # fmt: skip
        return max(widths, default=1)

    def rules_of(self, selection: Selection, kind: type) -> list[tuple[Policy, Any]]:
        return [(p, r) for p, r in self._of(kind) if p.id in selection.ids]

    def needs_entities(self) -> bool:
        return bool(self._of(EntitiesRule))

    def redaction_sections(self) -> list[RedactionRules]:
        return [p.redaction for p in self.policies if p.redaction is not None]

    async def scan(
        self, selection: Selection, text: str, direction: TextDirection, *,
        canary: str | None = None, finder: EntityFinder | None = None,
    ) -> Scanned[Finding]:  # fmt: skip
        """Every match of the selected rules in `text`, and how far the text is safe."""
        scanned = self._scanners[direction].scan(text)
        size = len(scanned.normalised.text)
        findings = [
            Finding(policy, rule, hit.start, hit.end, hit.reach <= size)
            for hit in scanned.hits if hit.key[0] in selection.ids
            for policy, rule in [self._rules[hit.key]]
        ]  # fmt: skip
        safe = scanned.normalised.index(size - selection.hold(direction) + 1)
        findings += await self._entities(selection, text, direction, finder)
        if direction == "prompt":
            findings += self._injections(selection, text)
        elif canary:
            findings += self._canary(selection, text, canary)
            safe = min(safe, len(text) - len(canary) + 1)
        return Scanned(findings, max(0, safe))

    async def _entities(
        self, selection: Selection, text: str, direction: str, finder: EntityFinder | None
    ) -> list[Finding]:
        rules = [(p, r) for p, r in self.rules_of(selection, EntitiesRule) if _covers(r, direction)]
        if not rules or not text:
            return []
        if finder is None:
            raise PolicyError([Problem(self.source, 0, "entity rules need the redaction engine")])
        wanted = frozenset(e for _, r in rules for e in r.entities)
        hits = await finder.find_entities(text, wanted)
        return [
            Finding(p, r, h.start, h.end, h.start + r.max_match_chars <= len(text), h.entity_type)
            for h in hits for p, r in rules
            if h.entity_type in r.entities and h.score >= r.min_score
        ]  # fmt: skip

    def _injections(self, selection: Selection, text: str) -> list[Finding]:
        found = []
        for policy, rule in self.rules_of(selection, InjectionRule):
            score, signals = injection_score(text, self._injection[(policy.id, rule.id)])
            if signals and score >= rule.threshold:
                found.append(Finding(policy, rule, 0, len(text), True, ",".join(signals)))
        return found

    def _canary(self, selection: Selection, text: str, canary: str) -> list[Finding]:
        at = text.find(canary)
        if at < 0:
            return []
        return [
            Finding(p, r, at, at + len(canary)) for p, r in self.rules_of(selection, CanaryRule)
        ]

    def canary_rules(self, selection: Selection) -> list[tuple[Policy, CanaryRule]]:
        return self.rules_of(selection, CanaryRule)

    def length_findings(self, selection: Selection, total: int) -> list[Finding]:
        """Max-length rules a completion of `total` characters breaks (the span is the excess)."""
        return [
            Finding(policy, rule, rule.max_chars, total, detail="max_chars")
            for policy, rule in self.rules_of(selection, MaxLengthRule)
            if total > rule.max_chars
        ]  # fmt: skip

    async def evaluate(
        self, selection: Selection, text: str, direction: TextDirection, *,
        canary: str | None = None, finder: EntityFinder | None = None,
    ) -> Release[Finding]:  # fmt: skip
        """A whole text: redactions applied, the matches that count, and the block if any."""
        scanned = await self.scan(selection, text, direction, canary=canary, finder=finder)
        findings = list(scanned.matches)
        if direction == "completion":
            findings += self.length_findings(selection, len(text))
        return settle(text, findings, len(text), final=True)[1]

    def request_rules(self, selection: Selection) -> list[tuple[Policy, RequestRule]]:
        return self.rules_of(selection, RequestRule)


def _covers(rule: Any, direction: str) -> bool:
    return getattr(rule, "direction", direction) in (direction, "both")


def _text_pattern(key: RuleKey, rule: RegexRule | WordsRule, hold_cap: int) -> TextPattern:
    if isinstance(rule, WordsRule):
        pattern = words_pattern(rule.words, case_sensitive=rule.case_sensitive,
                                whole_words=rule.whole_words)  # fmt: skip
        width = words_width(rule.words, whole_words=rule.whole_words)
        return TextPattern(key, pattern, width, 1 if rule.whole_words else 0)
    width = rule.max_match_chars or pattern_width(rule.pattern) or hold_cap
    return TextPattern(key, rule.pattern, min(width, max(hold_cap, rule.max_match_chars or 0)))


def _signals(rule: InjectionRule) -> InjectionSignals:
    weights = (rule.override_weight, rule.roleplay_weight, rule.hidden_text_weight,
               rule.encoded_weight)  # fmt: skip
    return compile_injection(rule.override_phrases, rule.roleplay_markers, weights,
                             rule.min_hidden_chars)  # fmt: skip


def _matches(patterns: Sequence[str], value: str | None) -> bool:
    if value is None:
        return "*" in patterns
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def _applies(
    policy: Policy, tenant: str | None, roles: tuple[str, ...], model: str, endpoint: str
) -> bool:
    scope = policy.applies_to
    role_ok = "*" in scope.roles or any(_matches(scope.roles, r) for r in roles)
    return (_matches(scope.tenants, tenant) and role_ok and _matches(scope.models, model)
            and _matches(scope.endpoints, endpoint))  # fmt: skip


_STRICTNESS = {"allow": 0, "pseudonymize": 1, "hash": 2, "mask": 3, "block": 4}


def merged_redaction(base: RedactionRules, sections: Sequence[RedactionRules]) -> RedactionRules:
    """The redactor's rules with every policy's `redaction:` section laid over them.

    Only what a section sets counts: its entity rules (the stricter action wins), allow and
    deny lists (joined), `images: refuse` and a lower `default_threshold`.
    """
    entities = dict(base.entities)
    allow, patterns, deny = list(base.allow), list(base.allow_patterns), list(base.deny)
    images, threshold = base.images, base.default_threshold
    for section in sections:
        given = section.model_fields_set
        if "entities" in given:
            for name, rule in section.entities.items():
                current = entities.get(name)
                if current is None or _STRICTNESS[rule.action] >= _STRICTNESS[current.action]:
                    entities[name] = rule
        allow += [v for v in section.allow if v not in allow]
        patterns += [v for v in section.allow_patterns if v not in patterns]
        deny += [v for v in section.deny if v not in deny]
        images = "refuse" if section.images == "refuse" else images
        if "default_threshold" in given:
            threshold = min(threshold, section.default_threshold)
    return RedactionRules(entities=entities, allow=tuple(allow), allow_patterns=tuple(patterns),
                          deny=tuple(deny), images=images, default_threshold=threshold)  # fmt: skip
