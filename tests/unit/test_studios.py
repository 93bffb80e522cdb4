"""studios.json parsing, the worker command, durations, and the lightning-sdk adapter against the real SDK's
classes (autospec'd, so every call must match the real signatures; nothing goes to the network)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from cli.main import app
from worker import studios
from worker.studios import DEFAULT_COMMAND, StudiosFileError, load_studios, worker_command

SEED002 = {  # seed 002's studios.json, as its README shows it
    "studio_1": {
        "user": "testName", "apiKey": "lk-secret-1", "userID": "user-id-1", "teamspaceName": "Vision-model",
        "studioName": "paper_no.6", "commandToRun": "python /teamspace/studios/this_studio/run.py",
    },
}


def write(tmp_path: Path, data, name: str = "studios.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---- studios.json ------------------------------------------------------------------------------------------
def test_seed002_keys_are_accepted(tmp_path):
    (spec,) = load_studios(write(tmp_path, SEED002))
    assert (spec.name, spec.entry, spec.teamspace, spec.user_id) == ("paper_no.6", "studio_1", "testName/Vision-model",
                                                                     "user-id-1")
    assert spec.api_key.get_secret_value() == "lk-secret-1" and "lk-secret-1" not in repr(spec)
    assert spec.command == "python /teamspace/studios/this_studio/run.py"
    assert spec.machine is None and spec.interruptible is None


def test_our_keys_and_defaults_from_settings(tmp_path):
    data = {"a": {"org": "lab", "teamspaceName": "ts", "studioName": "gpu-1", "machine": "L4", "interruptible": True},
            "b": {"teamspaceName": "ts", "studioName": "gpu-2"}}
    a, b = load_studios(write(tmp_path, data), api_key=SecretStr("from-env"), user_id="uid-env")
    assert (a.teamspace, a.machine, a.interruptible, a.command) == ("lab/ts", "L4", True, DEFAULT_COMMAND)
    assert b.teamspace == "ts" and b.api_key.get_secret_value() == "from-env" and b.user_id == "uid-env"


@pytest.mark.parametrize("change, message", [
    ({"apikey": "x"}, "studio_1: unknown key 'apikey' (known keys: user, org, apiKey"),
    ({"studioName": ""}, "studio_1: studioName: String should have at least 1 character"),
    ({"studioName": ["a"]}, "studio_1: studioName: Input should be a valid string"),
    ({"interruptible": "maybe"}, "studio_1: interruptible: Input should be a valid boolean"),
    ({"org": "lab"}, "studio_1: give either user or org"),
    ({"apiKey": None}, "studio_1: apiKey is missing (put it in the entry or LIGHTNING_API_KEY in .env)"),
    ({"userID": None}, "studio_1: userID is missing"),
    ({"apiKey": 12345}, "studio_1: apiKey: Input should be a valid string"),
])
def test_bad_entries_name_the_entry_and_the_key(tmp_path, change, message):
    entry = {k: v for k, v in {**SEED002["studio_1"], **change}.items() if v is not None}
    with pytest.raises(StudiosFileError) as error:
        load_studios(write(tmp_path, {"studio_1": entry}))
    assert message in str(error.value) and "lk-secret" not in str(error.value) and "12345" not in str(error.value)


def test_missing_required_key(tmp_path):
    entry = dict(SEED002["studio_1"])
    del entry["teamspaceName"]
    with pytest.raises(StudiosFileError, match="studio_1: teamspaceName is missing"):
        load_studios(write(tmp_path, {"studio_1": entry}))


@pytest.mark.parametrize("text, message", [
    ('{"studio_1": {"studioName": "x"},}', "is not valid JSON: .* at line 1, column"),  # seed 002's trailing comma
    ("[1, 2]", "must hold a non-empty mapping"),
    ("{}", "must hold a non-empty mapping"),
    ('{"studio_1": "paper_no.6"}', "studio_1 must be a mapping with keys user, org, apiKey"),
])
def test_bad_files(tmp_path, text, message):
    with pytest.raises(StudiosFileError, match=message):
        load_studios(write(tmp_path, text))


def test_missing_file_and_duplicate_studios(tmp_path):
    with pytest.raises(StudiosFileError, match="no such file"):
        load_studios(tmp_path / "nope.json")
    data = {"one": SEED002["studio_1"], "two": SEED002["studio_1"]}
    with pytest.raises(StudiosFileError, match="two: studioName 'paper_no.6' is also used by one"):
        load_studios(write(tmp_path, data))


def test_worker_command_exports_a_quoted_name_and_the_budget():
    spec = studios.StudioSpec(name="my studio", entry="e", teamspace="t", api_key=SecretStr("k"), user_id="u",
                              command="bash x.sh")
    assert worker_command(spec, None) == "export GRIDFLEET_WORKER_NAME='my studio'; bash x.sh"
    assert worker_command(spec, 14400.0) == ("export GRIDFLEET_WORKER_NAME='my studio' GRIDFLEET_MAX_RUN_TIME=14400; "
                                             "bash x.sh")


# ---- the command line ----------------------------------------------------------------------------------------
def test_cli_reports_a_bad_file_with_exit_2(tmp_path):
    entry = {**SEED002["studio_1"], "gpu": "L4"}
    result = CliRunner().invoke(app, ["studios", "up", str(write(tmp_path, {"studio_1": entry}))])
    assert result.exit_code == 2
    assert "unknown key 'gpu'" in result.output and "lk-secret" not in result.output


def test_cli_durations(tmp_path, monkeypatch):
    from cli.studios import duration

    assert [duration(v, "--x") for v in ("90", "90s", "30m", "4h", "3h50m", "1.5h")] == [90, 90, 1800, 14400, 13800,
                                                                                         5400]
    result = CliRunner().invoke(app, ["studios", "up", str(write(tmp_path, SEED002)), "--token", "t",
                                      "--batch-delay", "four hours"])
    assert result.exit_code == 2 and "--batch-delay takes seconds or a duration" in result.output


def test_cli_unreachable_api_fails_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(studios, "LightningStudios", mock.Mock(side_effect=AssertionError("must not start")))
    result = CliRunner().invoke(app, ["studios", "up", str(write(tmp_path, SEED002)), "--token", "gf_tok_secret",
                                      "--server", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot read the queue from http://127.0.0.1:9" in result.output
    assert "gf_tok_secret" not in result.output


# ---- the real lightning-sdk ----------------------------------------------------------------------------------
@pytest.fixture
def sdk(monkeypatch):
    """The real lightning_sdk module with Studio replaced by an autospec of the real class."""
    pytest.importorskip("lightning_sdk")
    module = studios.load_lightning_sdk()
    real = module.Studio
    seen_env = []
    fake = mock.create_autospec(real)
    fake.side_effect = lambda *a, **k: (seen_env.append((os.environ.get("LIGHTNING_API_KEY"),
                                                         os.environ.get("LIGHTNING_USER_ID"))), fake.return_value)[1]
    fake.return_value.run_and_detach.return_value = ("", None)  # the real one's result for a command that runs on
    monkeypatch.setattr(module, "Studio", fake)
    monkeypatch.delenv("LIGHTNING_API_KEY", raising=False)
    monkeypatch.setenv("LIGHTNING_USER_ID", "someone-before")
    return module, real, fake, seen_env


def test_adapter_uses_the_real_sdk_classes_and_signatures(tmp_path, sdk):
    module, real, fake, seen_env = sdk
    assert real.__module__ == "lightning_sdk.studio"
    (spec,) = load_studios(write(tmp_path, {"s": {**SEED002["studio_1"], "machine": "L4", "interruptible": False}}))
    client = studios.LightningStudios([spec], command_timeout=5)
    instance = fake.return_value
    instance.status = module.Status.Stopped

    client.start("paper_no.6", "L4", "export GRIDFLEET_WORKER_NAME=paper_no.6; run.sh", max_runtime=3600)
    fake.assert_called_with(name="paper_no.6", teamspace="testName/Vision-model", create_ok=False)
    instance.start.assert_called_once_with(machine=module.Machine.L4, interruptible=False, max_runtime=3600)
    command = instance.run_and_detach.call_args.args[0]
    assert command == f"(export GRIDFLEET_WORKER_NAME=paper_no.6; run.sh) >> {studios.WORKER_LOG} 2>&1"
    assert instance.run_and_detach.call_args.kwargs == {"timeout": 5}
    # The SDK reads credentials from the environment: set for the call, restored after.
    assert seen_env == [("lk-secret-1", "user-id-1")]
    assert "LIGHTNING_API_KEY" not in os.environ and os.environ["LIGHTNING_USER_ID"] == "someone-before"

    # A command that fails at once is a failed start (the launcher then stops the studio).
    instance.run_and_detach.return_value = ("", 2)
    with pytest.raises(RuntimeError, match="its command exited with code 2 at once"):
        client.start("paper_no.6", "L4", "run.sh")
    assert client.status("paper_no.6") == "Stopped"
    client.stop("paper_no.6")  # stopped already: nothing to do
    instance.stop.assert_not_called()
    instance.status = module.Status.Running
    client.stop("paper_no.6")
    instance.stop.assert_called_once_with()


def test_adapter_does_not_start_a_second_worker_in_a_running_studio(tmp_path, sdk):
    module, _, fake, _ = sdk
    (spec,) = load_studios(write(tmp_path, SEED002))
    fake.return_value.status = module.Status.Running
    studios.LightningStudios([spec]).start("paper_no.6", "L4", "run.sh")
    fake.return_value.start.assert_not_called()
    fake.return_value.run_and_detach.assert_not_called()


def test_adapter_default_machine_and_unknown_machine_names(tmp_path, sdk):
    module, _, fake, _ = sdk
    (spec,) = load_studios(write(tmp_path, SEED002))
    client = studios.LightningStudios([spec])
    fake.return_value.status = module.Status.Stopped
    client.start("paper_no.6", None, "run.sh")
    fake.return_value.start.assert_called_once_with(machine=None, interruptible=None, max_runtime=None)
    # A name the SDK does not know is passed through as a custom instance type, as the SDK does.
    assert module.Machine.from_str("g6.xlarge").name == "g6.xlarge"


def test_cli_down_and_status_with_an_injected_client(tmp_path, monkeypatch):
    class Fake:
        def __init__(self, specs):
            self.names = [s.name for s in specs]
            self.stopped = []

        def stop(self, name):
            if name == "paper_no.7":
                raise RuntimeError("Cannot reach lightning.ai")
            self.stopped.append(name)

        def status(self, name):
            return "Running"

    monkeypatch.setattr(studios, "LightningStudios", Fake)
    data = {**SEED002, "studio_2": {**SEED002["studio_1"], "studioName": "paper_no.7"}}
    path = write(tmp_path, data)
    result = CliRunner().invoke(app, ["studios", "status", str(path)])
    assert result.exit_code == 0 and "paper_no.6 (testName/Vision-model): Running" in result.output
    result = CliRunner().invoke(app, ["studios", "down", str(path)])
    assert result.exit_code == 1, result.output
    assert "paper_no.6: stopped" in result.output and "paper_no.7: FAILED to stop (RuntimeError: Cannot reach" \
        in result.output
