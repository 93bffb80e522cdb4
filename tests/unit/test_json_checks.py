"""common/json_checks.py: what a value may hold before it is stored (pure logic)."""
from __future__ import annotations

import pytest

from common.json_checks import MAX_DEPTH, BadValue, check, cleaned, is_plain, too_deep


def _deep(levels: int, leaf=1):
    value = leaf
    for _ in range(levels - 1):
        value = {"a": value}
    return {"a": value} if levels else leaf


def test_depth_is_counted_from_the_value_itself():
    assert too_deep(_deep(MAX_DEPTH), "config") is None
    problem = too_deep(_deep(MAX_DEPTH + 1), "config")
    assert problem is not None and problem.message == f"nested deeper than {MAX_DEPTH} levels"
    assert problem.field.startswith("config.a.a")


def test_no_depth_of_input_makes_the_checks_recurse():
    value = _deep(200_000)  # far past Python's recursion limit
    with pytest.raises(BadValue, match="nested deeper than 64 levels"):
        check(value, "result")
    with pytest.raises(BadValue, match="nested deeper than 64 levels"):
        cleaned(value, "result")
    assert not is_plain(value)


@pytest.mark.parametrize("bad, words", [("a\x00b", "NUL character"), ("a\ud800b", "lone surrogate (\\ud800)")])
def test_check_refuses_a_bad_character_in_any_string_or_key_and_says_where(bad, words):
    with pytest.raises(BadValue) as value_error:
        check({"optim": {"names": ["ok", bad]}}, "config")
    assert value_error.value.field == "config.optim.names.1" and words in value_error.value.message
    with pytest.raises(BadValue) as key_error:
        check({"optim": {bad: 1}}, "config")
    assert key_error.value.message.startswith("the key ") and words in key_error.value.message


def test_cleaned_repairs_strings_and_keys_and_lists_what_changed():
    value = {"loss": 0.5, "note": "a\x00b", "t\ud800": ["\udc00", 1], "ok": "fine"}
    repaired, changed = cleaned(value, "metrics.0.values")
    assert repaired == {"loss": 0.5, "note": "a\ufffdb", "t\ufffd": ["\ufffd", 1], "ok": "fine"}
    assert changed == ["metrics.0.values.note", "metrics.0.values.t\ufffd (key)", "metrics.0.values.t\ufffd.0"]
    assert value["note"] == "a\x00b"  # the input is not modified


def test_a_valid_surrogate_pair_is_not_a_lone_surrogate():
    value = {"emoji": "\U0001F600", "text": "caf\u00e9"}  # a Python str holds the pair as one code point
    assert is_plain(value) and check(value, "config") is value and cleaned(value, "x") == (value, [])


def test_is_plain_is_never_wrong_about_a_bad_value():
    for bad in ({"a": "\x00"}, {"a": "\ud800"}, {"\x00": 1}, _deep(MAX_DEPTH + 1)):
        assert not is_plain(bad), bad
    assert is_plain({"a": [1, 2.5, None, True, "x"], "b": _deep(MAX_DEPTH - 1)})
