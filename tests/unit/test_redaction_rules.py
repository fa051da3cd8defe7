"""RedactionRules: what the analyzer looks for, and the views the request path reads."""

from __future__ import annotations

from gateway.redaction_rules import EntityRule, RedactionRules, merged_redaction


def test_detected_types_are_sorted_without_allowed_ones_or_the_deny_list():
    rules = RedactionRules(entities={"URL": EntityRule(), "EMAIL_ADDRESS": EntityRule(),
                                     "IP_ADDRESS": EntityRule(action="allow"),
                                     "DENY_LIST": EntityRule()})  # fmt: skip
    assert rules.detected() == ("EMAIL_ADDRESS", "URL")
    assert rules.detected() is rules.detected()  # built once per rules


def test_an_unlisted_type_is_allowed_through():
    rules = RedactionRules(entities={"URL": EntityRule(action="mask")})
    assert rules.rule_for("URL").action == "mask"
    assert rules.rule_for("PERSON").action == "allow"


def test_allow_and_deny_views():
    rules = RedactionRules(allow=("Acme Cloud",), allow_patterns=(r".*@acme\.test",),
                           deny=("Falcon", "Project Falcon"))  # fmt: skip
    assert rules.allowed_values == {"acme cloud"}
    assert [p.pattern for p in rules.allow_regexes] == [r".*@acme\.test"]
    assert rules.deny_regex is not None
    found = [m.group() for m in rules.deny_regex.finditer("the project falcon and FALCONS")]
    assert found == ["project falcon"]


def test_no_deny_pattern_when_the_deny_list_is_empty_or_allowed():
    assert RedactionRules().deny_regex is None
    allowed = RedactionRules(entities={"DENY_LIST": EntityRule(action="allow")}, deny=("x",))
    assert allowed.deny_regex is None


def test_equal_rules_compare_equal_once_their_views_were_built():
    one, two = RedactionRules(deny=("x",)), RedactionRules(deny=("x",))
    assert one.deny_regex is not None and one.detected()
    assert one == two and one.model_dump() == two.model_dump()


def test_redaction_sections_merge_strictest_and_join_lists():
    base = RedactionRules()
    first = RedactionRules.model_validate({"entities": {"PERSON": {"action": "mask"}},
                                           "allow": ["Acme"]})  # fmt: skip
    second = RedactionRules.model_validate({"entities": {"PERSON": {"action": "allow"}},
                                            "deny": ["bluebird"], "images": "refuse"})  # fmt: skip
    merged = merged_redaction(base, [first, second])
    assert merged.entities["PERSON"].action == "mask"
    assert "EMAIL_ADDRESS" in merged.entities  # untouched defaults stay
    assert merged.allow == ("Acme",) and merged.deny == ("bluebird",)
    assert merged.images == "refuse"
