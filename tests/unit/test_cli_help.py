"""The help pages: one line a paragraph, flags without a type, defaults that are the real ones."""
from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from cli.main import app
from common.settings import Settings

COMMANDS = [[], ["run"], ["status"], ["plots"], ["worker"], ["refine"], ["serve"], ["token", "create"], ["studios"],
            ["analyze"], ["import"], ["pull"], ["submit"], ["token"], ["fleet", "status"],
            ["studios", "up"], ["fleet"]]


def page(args: list[str]) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "gridfleet")
def test_flags_show_no_bool_type(args):
    text = page(args)
    assert "--help" in text and "<bool>" not in text


def test_command_descriptions_are_not_hard_wrapped():
    text = page([])
    rows = [line for line in text.splitlines() if re.match(r"^│ (import|refine|run|submit|plots) ", line)]
    assert len(rows) == 5, text
    following = text.splitlines()[text.splitlines().index(rows[0]) + 1]
    assert re.match(r"^│ [a-z]+ ", following), "the import description went on to a second line:\n" + text
    assert "only the rest will run. Importing again" in page(["import"])


def test_defaults_named_in_help_are_the_settings_defaults():
    fields = Settings.model_fields
    assert f"else {fields['server_url'].default})" in page(["worker"])
    assert f"else {fields['host'].default})" in page(["serve"]) and f"else {fields['port'].default})" in page(["serve"])
    assert "settings." not in page(["worker"]) + page(["serve"]) + page(["status"]) + page(["plots"])
