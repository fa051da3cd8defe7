"""The policy file format: what one YAML file in `policies/` may say, as pydantic models.

Owns the shape, defaults and field-level checks of a policy (id, version, scope, mode, rules of
each kind, redaction settings, tests) and the JSON Schema editors validate against. Must not
compile rules, read files or know the request path: `policies.py` does that.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from gateway.redaction_rules import SUPPORTED_ENTITIES, RedactionRules

Action = Literal["block", "redact", "flag"]
Severity = Literal["low", "medium", "high", "critical"]
Direction = Literal["prompt", "completion", "both"]
Mode = Literal["enforce", "shadow"]
Expectation = Literal["block", "redact", "flag", "pass"]

_ID = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


def _as_text(value: Any) -> Any:
    """Lets `version: 2` or `version: 1.5` stand for the string."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AppliesTo(_Model):
    """Which requests a policy covers; every list holds glob patterns and `*` means any."""

    tenants: tuple[str, ...] = Field(("*",), description="Tenants (from the caller's identity).")
    roles: tuple[str, ...] = Field(("*",), description="Roles; the caller needs one of them.")
    models: tuple[str, ...] = Field(("*",), description="Client-facing model names.")
    endpoints: tuple[str, ...] = Field(
        ("*",), description="chat.completions, responses, completions, embeddings."
    )


class _Rule(_Model):
    id: str = Field(pattern=_ID, description="Unique within the policy; named in every decision.")
    description: str = Field("", description="What the rule is for.")
    action: Action = Field("block", description="block, redact (replace the match) or flag.")
    severity: Severity = Field("medium", description="Recorded with every decision.")


class _TextRule(_Rule):
    direction: Direction = Field("both", description="prompt, completion or both.")
    replacement: str = Field("[REDACTED]", description="What a redacted match becomes.")


class RegexRule(_TextRule):
    """A regular expression with RE2 semantics (linear time; no backreferences or lookaround)."""

    kind: Literal["regex"]
    pattern: str = Field(min_length=1, description="RE2 pattern, run on the normalised text.")
    max_match_chars: int | None = Field(
        None, ge=1, le=65536, description="Longest match, for patterns with unbounded repeats."
    )


class WordsRule(_TextRule):
    """Words and phrases, matched after Unicode and (by default) case normalisation."""

    kind: Literal["words"]
    words: tuple[str, ...] = Field(min_length=1, description="Words or phrases to find.")
    case_sensitive: bool = Field(False, description="Match case exactly.")
    whole_words: bool = Field(True, description="Only match at word boundaries.")


class EntitiesRule(_TextRule):
    """Entity types found by the redaction engine (Presidio), e.g. CREDIT_CARD."""

    kind: Literal["entities"]
    entities: tuple[str, ...] = Field(min_length=1, description="Presidio entity types.")
    min_score: float = Field(0.5, ge=0, le=1, description="Lowest detection score that counts.")
    max_match_chars: int = Field(
        64, ge=1, le=4096, description="Longest entity value, for the stream hold-back window."
    )

    @model_validator(mode="after")
    def _known_entities(self) -> EntitiesRule:
        unknown = sorted(set(self.entities) - SUPPORTED_ENTITIES)
        if unknown:
            raise ValueError(f"unknown entity types: {', '.join(unknown)}")
        return self


class MaxLengthRule(_Rule):
    """Completions longer than `max_chars`: block ends them, redact truncates them."""

    kind: Literal["max_length"]
    max_chars: int = Field(ge=1, description="Longest completion text in characters.")


class InjectionRule(_Rule):
    """Prompt-injection heuristics: signals add their weight; `threshold` or more triggers."""

    kind: Literal["injection"]
    threshold: float = Field(1.0, gt=0, description="Score at which the rule triggers.")
    override_phrases: tuple[str, ...] = Field(
        (), description="e.g. 'ignore previous instructions'."
    )
    roleplay_markers: tuple[str, ...] = Field((), description="e.g. 'you are now DAN'.")
    override_weight: float = Field(1.0, ge=0, description="Score of an override phrase.")
    roleplay_weight: float = Field(0.5, ge=0, description="Score of a role-play marker.")
    hidden_text_weight: float = Field(
        0.5, ge=0, description="Score of zero-width or Unicode tag characters."
    )
    encoded_weight: float = Field(
        1.0, ge=0, description="Score of base64 or hex that decodes to a phrase or marker."
    )
    min_hidden_chars: int = Field(1, ge=1, description="Hidden characters needed to count.")

    @model_validator(mode="after")
    def _has_signals(self) -> InjectionRule:
        if self.action == "redact":
            raise ValueError("injection rules can block or flag, not redact")
        return self


class CanaryRule(_Rule):
    """A per-request marker in the system prompt; seeing it in a completion means a leak."""

    kind: Literal["canary"]

    @model_validator(mode="after")
    def _not_redact(self) -> CanaryRule:
        if self.action == "redact":
            raise ValueError("canary rules can block or flag, not redact")
        return self


class RequestRule(_Rule):
    """Constraints on the request itself. block refuses, redact rewrites, flag logs."""

    kind: Literal["request"]
    allowed_models: tuple[str, ...] | None = Field(None, description="Model globs allowed.")
    denied_models: tuple[str, ...] = Field((), description="Model globs refused.")
    max_tokens: int | None = Field(None, ge=1, description="Cap on the output-token parameters.")
    allowed_tools: tuple[str, ...] | None = Field(None, description="Tool names (globs) allowed.")
    images: bool = Field(True, description="Whether image inputs are allowed.")
    force_store_false: bool = Field(False, description="Send store: false to the provider.")
    pseudonymize_user: bool = Field(
        False, description="Replace user/safety_identifier with the caller's pseudonym."
    )


Rule = Annotated[
    RegexRule | WordsRule | EntitiesRule | MaxLengthRule | InjectionRule | CanaryRule
    | RequestRule,
    Field(discriminator="kind"),
]  # fmt: skip


class PolicyTest(_Model):
    """One case for `gateway policy test`: text in, decision expected."""

    name: str = Field("", description="What the case shows.")
    text: str = Field(description="Prompt or completion text.")
    direction: Literal["prompt", "completion"] = Field("prompt", description="Which way.")
    expect: Expectation = Field(description="The strongest action expected, or pass.")
    rule: str | None = Field(None, description="The rule id expected to decide.")
    output: str | None = Field(None, description="Expected text after redaction.")


class Policy(_Model):
    """One policy file."""

    id: str = Field(pattern=_ID, description="Unique across the directory.")
    version: Annotated[str, BeforeValidator(_as_text)] = Field(
        min_length=1, description="Recorded with every decision."
    )
    description: str = Field("", description="What the policy is for.")
    applies_to: AppliesTo = Field(AppliesTo(), description="Which requests it covers.")
    mode: Mode = Field("enforce", description="shadow only logs what it would have done.")
    rules: tuple[Rule, ...] = Field((), description="The rules, of any kind.")
    redaction: RedactionRules | None = Field(
        None, description="Redaction settings merged into the redactor's (see Prompt redaction)."
    )
    tests: tuple[PolicyTest, ...] = Field((), description="Cases run by `gateway policy test`.")

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        ids = [rule.id for rule in self.rules]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate rule ids: {', '.join(duplicates)}")
        for test in self.tests:
            if test.rule is not None and test.rule not in ids:
                raise ValueError(f"test {test.name or test.text[:30]!r} names unknown rule")
        return self


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of one policy file, for editors and `policies/schema.json`."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Gateway policy file"
    return schema
