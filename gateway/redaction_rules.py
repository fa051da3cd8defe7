"""What prompt redaction looks for and what it does with each finding: the `RedactionRules` model.

Owns the per-entity actions (pseudonymize, mask, hash, block, allow), score thresholds, allow-
and deny-lists, restore switches, the handling of image parts, and how policy files'
`redaction:` sections are laid over the configured rules (`merged_redaction`). The same model is the
`redaction.rules` section of the config and the `redaction:` section of policy files, so it is
self-contained and frozen. Must not import anything but pydantic and the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Action = Literal["pseudonymize", "mask", "hash", "block", "allow"]

NER_ENTITIES = ("PERSON", "LOCATION", "ORGANIZATION", "NRP", "DATE_TIME")
"""Entity types that need the spaCy NER model (everything else is patterns and checksums)."""

SECRET_ENTITIES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "GCP_API_KEY",
    "AZURE_KEY",
    "GITHUB_TOKEN",
    "SLACK_TOKEN",
    "STRIPE_KEY",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "PRIVATE_KEY",
    "JWT",
    "PASSWORD",
    "SECRET",
)
"""Entity types found by the project's own recognizers (`gateway.secret_recognizers`)."""

PATTERN_ENTITIES = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "US_SSN",
    "CREDIT_CARD",
    "IBAN_CODE",
    "IP_ADDRESS",
    "URL",
    "CRYPTO",
    "US_BANK_NUMBER",
    "US_DRIVER_LICENSE",
    "US_ITIN",
    "US_PASSPORT",
    "UK_NHS",
    "MEDICAL_LICENSE",
    "STREET_ADDRESS",
    "DATE_OF_BIRTH",
)
"""Entity types found by Presidio's predefined pattern recognizers (and our street addresses)."""

DENY_LIST_ENTITY = "DENY_LIST"
"""The entity type given to deny-list matches; its rule says what to do with them."""

SUPPORTED_ENTITIES = frozenset(NER_ENTITIES + SECRET_ENTITIES + PATTERN_ENTITIES)
_ENTITY_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


class EntityRule(BaseModel):
    """What to do with one entity type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Action = Field("pseudonymize", description="What to do with a finding.")
    threshold: float | None = Field(
        None, ge=0, le=1, description="Lowest score that counts (none: the rules' default)."
    )
    restore: bool = Field(
        True, description="Put the original value back into the answer (pseudonymize only)."
    )


_ALLOWED = EntityRule(action="allow")


def _pii(threshold: float | None = None) -> EntityRule:
    return EntityRule(action="pseudonymize", threshold=threshold)


def _secret() -> EntityRule:
    return EntityRule(action="pseudonymize", restore=False)


def default_entities() -> dict[str, EntityRule]:
    """Personal data is pseudonymized and restored; secrets are pseudonymized, never restored."""
    rules = {
        "PERSON": _pii(0.6),
        "LOCATION": _pii(0.6),
        "STREET_ADDRESS": _pii(),
        "EMAIL_ADDRESS": _pii(),
        "PHONE_NUMBER": _pii(0.5),
        "US_SSN": _pii(0.3),
        "CREDIT_CARD": _pii(),
        "IBAN_CODE": _pii(),
        "IP_ADDRESS": _pii(0.6),
        "DATE_OF_BIRTH": _pii(),
        DENY_LIST_ENTITY: _pii(),
    }
    rules.update({name: _secret() for name in SECRET_ENTITIES})
    return rules


class RedactionRules(BaseModel):
    """The redaction policy applied to one request; frozen so engines can share it safely."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    entities: dict[str, EntityRule] = Field(
        default_factory=default_entities,
        description="Entity types to detect and what to do with each; others are ignored.",
    )
    default_threshold: float = Field(
        0.5, ge=0, le=1, description="Lowest score that counts when a rule sets none."
    )
    allow: tuple[str, ...] = Field(
        (), description="Values never redacted (exact, case-insensitive), e.g. product names."
    )
    allow_patterns: tuple[str, ...] = Field(
        (), description="Regular expressions; a finding matching one in full is not redacted."
    )
    deny: tuple[str, ...] = Field(
        (), description="Words or phrases always redacted (case-insensitive) as DENY_LIST."
    )
    images: Literal["pass", "refuse"] = Field(
        "pass", description="What to do with image, audio and file parts, which are not scanned."
    )

    @field_validator("entities")
    @classmethod
    def _known_entities(cls, value: dict[str, EntityRule]) -> dict[str, EntityRule]:
        for name in value:
            if not _ENTITY_NAME.match(name):
                raise ValueError(f"entity type {name!r} must be UPPER_SNAKE_CASE")
            if name not in SUPPORTED_ENTITIES and name != DENY_LIST_ENTITY:
                raise ValueError(f"entity type {name!r} is not one the redactor can detect")
        return value

    @field_validator("allow_patterns")
    @classmethod
    def _patterns_compile(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"allow pattern {pattern!r} is not a valid regex: {exc}") from exc
        return value

    # Views derived from the fields, built on first use and kept: rules are frozen and shared
    # by every request, so the request path must not rebuild them. (Build changed rules with
    # the constructor: `model_copy(update=...)` would carry these views over unchanged.)

    @cached_property
    def detected_entities(self) -> tuple[str, ...]:
        """Entity types the analyzer must look for (sorted; `allow` and the deny-list excluded)."""
        return tuple(sorted(
            name for name, rule in self.entities.items()
            if rule.action != "allow" and name != DENY_LIST_ENTITY
        ))  # fmt: skip

    @cached_property
    def allowed_values(self) -> frozenset[str]:
        """The `allow` list, case-folded."""
        return frozenset(value.casefold() for value in self.allow)

    @cached_property
    def allow_regexes(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(pattern) for pattern in self.allow_patterns)

    @cached_property
    def deny_regex(self) -> re.Pattern[str] | None:
        """One pattern for the whole deny-list (longest first), or None when it does not apply."""
        if not self.deny or self.rule_for(DENY_LIST_ENTITY).action == "allow":
            return None
        words = "|".join(re.escape(word) for word in sorted(self.deny, key=len, reverse=True))
        return re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)

    def detected(self) -> tuple[str, ...]:
        """Entity types the analyzer must look for (sorted; `allow` and the deny-list excluded)."""
        return self.detected_entities

    def rule_for(self, entity: str) -> EntityRule:
        """The rule of `entity` (an unlisted type is allowed through)."""
        rule = self.entities.get(entity)
        return _ALLOWED if rule is None else rule

    def threshold_for(self, entity: str) -> float:
        threshold = self.rule_for(entity).threshold
        return self.default_threshold if threshold is None else threshold


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
