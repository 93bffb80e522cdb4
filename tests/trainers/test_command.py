"""The command trainer, for real: real scripts in subprocesses, a real TrainerContext talking through a
multiprocessing Pipe, a real LocalStore, and (twice) the real runner in a spawned child process."""
from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import harness  # tests/trainers/harness.py
import pytest
from pydantic import ValidationError

from worker import runner, trainers
from worker.trainers import command

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


class Harness(harness.Harness):
    def run(self, config: dict):
        return self.train(command, config)


def write_script(tmp_path: Path, body: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def doc_example() -> str:
    text = (REPO / "docs" / "command_trainer.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


# ---- the documented example, end to end ---------------------------------------------------------
def _reference_run(steps: int, lr: float, start: tuple[int, float] = (0, 5.0)) -> list[tuple[int, float]]:
    step, w, out = *start, []
    while step < steps:
        w, step = w - lr * 2 * w, step + 1
        out.append((step, w * w))
    return out


def test_doc_example_is_15_lines_and_reports_metrics_progress_checkpoints_and_result(tmp_path):
    source = doc_example()
    assert len(source.strip().splitlines()) == 15
    script = write_script(tmp_path, source, "train.py")
    h = Harness(tmp_path)
    result = h.run({"command": [PY, str(script)], "config": {"steps": 100, "lr": 0.1}})

    expected = _reference_run(100, 0.1)
    assert [(step, values["loss"]) for step, values in h.reports] == expected
    assert h.of("progress")[-1] == (100.0, 100.0)
    assert len(h.of("progress")) == 100
    assert [p["step"] for p in h.checkpoints] == [20, 40, 60, 80, 100]
    assert result == {"loss": expected[-1][1], "steps": 100}
    state = h.store.load(h.checkpoints[1])
    assert state["step"] == 40 and state["name"] == "checkpoint.bin"
    assert not list((tmp_path / "work" / "checkpoints" / ".outbox").iterdir())  # handed-over copies consumed


def test_doc_example_resumes_from_the_stored_checkpoint_on_a_fresh_workdir(tmp_path):
    script = write_script(tmp_path, doc_example(), "train.py")
    config = {"command": [PY, str(script)], "config": {"steps": 100, "lr": 0.1}}
    first = Harness(tmp_path)
    straight = first.run(config)
    pointer = first.checkpoints[1]  # as if the worker died right after the step-40 checkpoint
    assert pointer["step"] == 40

    second = Harness(tmp_path, workdir="other-worker", checkpoint=pointer)
    resumed = second.run(config)
    assert second.reports[0][0] == 41
    assert [(s, v["loss"]) for s, v in second.reports] == _reference_run(100, 0.1)[40:]
    assert resumed == straight  # bit for bit: the script continued from the exact saved state
    assert (tmp_path / "other-worker" / "checkpoints" / "checkpoint.bin").exists()
    assert any("resuming from the checkpoint of step 40" in message for _kind, message in second.of("event"))


# ---- stopping ------------------------------------------------------------------------------------
SLOW_SCRIPT = """
    import json, os, time
    from worker import script_api as gf     # gridfleet's own environment: the package import works too

    steps = gf.config()["steps"]
    step = 0
    if gf.load_checkpoint():
        step = json.load(open(gf.load_checkpoint()))["step"]
        assert gf.resume_step() == step
    while step < steps:
        if gf.should_stop():
            with open(os.path.join(os.environ["GRIDFLEET_CHECKPOINT_DIR"], "state.json"), "w") as f:
                json.dump({"step": step}, f)
            gf.save_checkpoint(f.name)
            raise SystemExit(0)
        time.sleep(0.02)
        step += 1
        gf.report(step, loss=1.0 / step)
    gf.result(loss=1.0 / step, steps=step)
"""


def test_stop_sends_sigterm_the_script_checkpoints_and_a_new_attempt_resumes(tmp_path):
    script = write_script(tmp_path, SLOW_SCRIPT)
    config = {"command": [PY, str(script)], "config": {"steps": 40}}
    first = Harness(tmp_path)
    first.on_message = lambda h, m: m[0] == "report" and m[1] >= 5 and h.stop_event.set()
    began = time.monotonic()
    stopped = first.run(config)
    assert time.monotonic() - began < 10
    k = stopped["stopped_at"]
    assert 5 <= k < 40
    assert first.checkpoints[-1]["step"] == k  # the last report's step: the script saved where it stopped
    assert first.store.load(first.checkpoints[-1])["name"] == "state.json"

    second = Harness(tmp_path, workdir="work2", checkpoint=first.checkpoints[-1])
    done = second.run(config)
    assert second.reports[0][0] == k + 1
    assert [s for s, _ in second.reports] == list(range(k + 1, 41))
    assert done == {"loss": 1.0 / 40, "steps": 40}


def test_a_script_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    script = write_script(tmp_path, """
        import signal, time
        import gridfleet_script_api as gf
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        gf.report(1, loss=1.0)
        time.sleep(60)
    """)
    h = Harness(tmp_path)
    h.on_message = lambda h, m: m[0] == "report" and h.stop_event.set()
    began = time.monotonic()
    assert h.run({"command": [PY, str(script)], "grace_seconds": 0.5}) == {"stopped_at": 1}
    assert time.monotonic() - began < 10
    assert any("did not exit within 0.5 s" in message for _kind, message in h.of("event"))


def test_timeout_terminates_the_script_and_fails_the_attempt(tmp_path):
    h = Harness(tmp_path)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timeout_seconds=0\.5"):
        h.run({"command": [PY, "-c", "import time; time.sleep(60)"], "timeout_seconds": 0.5, "grace_seconds": 1})
    assert time.monotonic() - began < 10


def test_a_stop_requested_before_the_start_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    h = Harness(tmp_path)
    h.stop_event.set()
    assert h.run({"command": [PY, "-c", f"open({str(marker)!r}, 'w')"]}) == {"stopped_at": 0}
    assert not marker.exists()


# ---- failures --------------------------------------------------------------------------------------
def test_failing_script_raises_with_the_exit_status_and_the_tail_of_stderr(tmp_path):
    script = write_script(tmp_path, """
        import sys
        for i in range(100):
            print(f"noise line {i}", file=sys.stderr)
        raise ValueError("learning rate must be positive")
    """)
    h = Harness(tmp_path)
    with pytest.raises(command.CommandFailed) as info:
        h.run({"command": [PY, str(script)]})
    message = str(info.value)
    assert "exited with status 1" in message
    assert "ValueError: learning rate must be positive" in message
    assert "noise line 99" in message and "noise line 0\n" not in message  # a tail, not everything


def test_a_script_killed_by_a_signal_says_which(tmp_path):
    h = Harness(tmp_path)
    with pytest.raises(command.CommandFailed, match="killed by SIGKILL"):
        h.run({"command": [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]})


def test_a_missing_program_is_a_clear_error(tmp_path):
    h = Harness(tmp_path)
    with pytest.raises(command.CommandFailed, match="cannot start"):
        h.run({"command": "no-such-program-gridfleet --x"})


def test_a_malformed_protocol_line_fails_the_job_and_kills_the_script(tmp_path):
    h = Harness(tmp_path)
    began = time.monotonic()
    with pytest.raises(command.ProtocolError, match="not JSON"):
        h.run({"command": [PY, "-c", "import time; print('@gridfleet {oops', flush=True); time.sleep(60)"]})
    assert time.monotonic() - began < 10


def test_a_checkpoint_line_naming_a_missing_file_fails_the_job(tmp_path):
    h = Harness(tmp_path)
    with pytest.raises(command.ProtocolError, match="does not exist"):
        h.run({"command": [PY, "-c", "print('@gridfleet {\"checkpoint\": \"nope.bin\", \"step\": 1}')"]})


# ---- the protocol without the helper, the environment, the config -------------------------------
def test_plain_lines_from_a_shell_script(tmp_path, capsys):
    shell = r"""
        echo "plain output"
        echo "@gridfleet {\"report\": {\"step\": 3, \"loss\": 0.5, \"acc\": 0.9}}"
        printf 'half a line @gridfleet {"progress": [3, 10]}\n'
        printf 'weights' > "$GRIDFLEET_CHECKPOINT_DIR/w.bin"
        echo "@gridfleet {\"checkpoint\": \"$GRIDFLEET_CHECKPOINT_DIR/w.bin\", \"move\": true}"
        echo "@gridfleet {\"event\": {\"kind\": \"info\", \"message\": \"phase 2\"}, \"bogus\": 1}"
        echo "to stderr" >&2
    """
    h = Harness(tmp_path)
    result = h.run({"command": ["sh", "-c", textwrap.dedent(shell)]})
    assert result == {"loss": 0.5, "acc": 0.9, "step": 3}  # no result line: the last report's metrics
    assert h.reports == [(3, {"loss": 0.5, "acc": 0.9})]
    assert h.of("progress") == [(3.0, 10.0)]
    (pointer,) = h.checkpoints
    assert pointer["step"] == 3  # defaults to the last reported step
    assert h.store.load(pointer) == {"step": 3, "file": b"weights", "name": "w.bin"}
    assert not (tmp_path / "work" / "checkpoints" / "w.bin").exists()  # "move": gridfleet deleted it
    assert ("info", "phase 2") in h.of("event")
    assert any("unknown protocol key 'bogus'" in message for _kind, message in h.of("event"))
    out, err = capsys.readouterr()
    assert "plain output" in out and "half a line" in out and "@gridfleet" not in out
    assert "to stderr" in err


def test_command_string_is_split_without_a_shell_and_the_environment_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDFLEET_ADMIN_TOKEN", "secret")  # the worker's own settings stay out
    script = write_script(tmp_path, """
        import json, os, sys
        import gridfleet_script_api as gf
        gf.result(argv=sys.argv[1:], config=gf.config(), seed=gf.seed(), cwd=os.getcwd(),
                  mine=os.environ.get("MY_VAR"), threads=os.environ.get("OMP_NUM_THREADS"),
                  token=os.environ.get("GRIDFLEET_ADMIN_TOKEN"), resume=gf.load_checkpoint(),
                  config_file=os.environ["GRIDFLEET_CONFIG"], unbuffered=os.environ.get("PYTHONUNBUFFERED"))
    """)
    h = Harness(tmp_path, seed=11)
    result = h.run({
        "command": f"{PY} {script} --name 'two words' $HOME",
        "config": {"lr": 0.01, "layers": [1, 2]},
        "env": {"MY_VAR": "x", "OMP_NUM_THREADS": 4},
        "cwd": str(tmp_path),
    })
    assert result["argv"] == ["--name", "two words", "$HOME"]  # shlex split, no shell expansion
    assert result["config"] == {"lr": 0.01, "layers": [1, 2]}
    assert result["seed"] == 11
    assert result["cwd"] == str(tmp_path)
    assert (result["mine"], result["threads"], result["token"], result["resume"]) == ("x", "4", None, None)
    assert result["unbuffered"] == "1"
    assert Path(result["config_file"]).parent == tmp_path / "work"


@pytest.mark.parametrize(
    "config, field, words",
    [
        ({"command": []}, "command", "empty"),
        ({"command": ""}, "command", "empty"),
        ({"command": "   "}, "command", "empty"),
        ({"command": ["", "x"]}, "command", "empty"),
        ({"command": "python 'unclosed"}, "command", "quotation"),
        ({}, "command", "required"),
        ({"command": ["x"], "timeout_seconds": 0}, "timeout_seconds", "greater than 0"),
        ({"command": ["x"], "grace_seconds": -1}, "grace_seconds", ""),
        ({"command": ["x"], "env": {"GRIDFLEET_SEED": "1"}}, "env", "set by gridfleet"),
        ({"command": ["x"], "env": {"A=B": "1"}}, "env", "not a valid"),
        ({"command": ["x"], "config": [1, 2]}, "config", "dictionary"),
        ({"command": ["x"], "script": "y"}, "script", "not permitted"),
    ],
)
def test_bad_configs_are_rejected_naming_the_field(config, field, words):
    with pytest.raises(ValidationError) as info:
        command.Config.model_validate(config)
    assert field in [err["loc"][0] for err in info.value.errors()]
    assert words in str(info.value)
    with pytest.raises(trainers.InvalidConfig) as via_registry:  # what POST /grids turns into a 422
        trainers.validate_config("command", config)
    assert any(name.startswith(f"config.{field}") for name, _ in via_registry.value.errors)


def test_registered_and_importable_without_torch():
    assert "command" in trainers.known_trainers()
    code = ("import sys; from worker import trainers; trainers.validate_config('command', {'command': 'x'}); "
            "import worker.script_api; assert 'torch' not in sys.modules")
    assert os.system(f"{PY} -c \"{code}\"") == 0


# ---- through the real runner, in a spawned child ----------------------------------------------------
def _spawn_job(tmp_path: Path, config: dict):
    mp = multiprocessing.get_context("spawn")
    receiver, sender = mp.Pipe(duplex=False)
    stop = mp.Event()
    job = {"id": 3, "grid_id": 2, "seed": 5, "attempt": 1, "trainer": "command", "config": config,
           "checkpoint": None}
    child = mp.Process(target=runner.run_job, daemon=True,
                       args=(job, str(tmp_path / "work"), str(tmp_path / "store"), 3, sender, stop,
                             os.getpid()))
    child.start()
    sender.close()
    return child, receiver, stop


def test_run_job_in_a_spawned_child_sends_the_result_and_logs_the_output(tmp_path):
    script = write_script(tmp_path, """
        import sys
        import gridfleet_script_api as gf
        print("hello from the script")
        print("a warning", file=sys.stderr)
        gf.report(1, loss=2.0)
        gf.save_checkpoint(b"state", step=1)
        gf.result(loss=2.0, seed=gf.seed())
    """)
    child, receiver, _stop = _spawn_job(tmp_path, {"command": [PY, str(script)]})
    messages = []
    while True:
        try:
            messages.append(receiver.recv())
        except EOFError:
            break
    child.join(30)
    assert child.exitcode == 0
    kinds = [m[0] for m in messages]
    assert kinds.count("report") == 1 and kinds.count("checkpoint") == 1
    assert messages[-1] == ("result", {"loss": 2.0, "seed": 5})
    log = (tmp_path / "work" / runner.OUTPUT_LOG).read_text()
    assert "hello from the script" in log and "a warning" in log


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie waiting for its reaper is dead


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_kill_9_of_the_trainer_process_kills_the_script_too(tmp_path):
    pid_file = tmp_path / "script.pid"
    script = write_script(tmp_path, f"""
        import os, time
        open({str(pid_file)!r} + ".tmp", "w").write(str(os.getpid()))
        os.replace({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
        time.sleep(120)
    """)
    child, _receiver, _stop = _spawn_job(tmp_path, {"command": [PY, str(script)]})
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    script_pid = int(pid_file.read_text())
    assert _alive(script_pid)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    deadline = time.monotonic() + 10
    while _alive(script_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(script_pid), "the script outlived its trainer process (an orphan would keep training)"
