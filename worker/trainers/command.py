"""command: run any user script or program as a job, with the config as JSON. docs/command_trainer.md

Config: `command` (argv list, or one string split like a shell would, without a shell), `config` (a
mapping handed to the script), `env` (extra environment), `cwd`, `timeout_seconds`, `grace_seconds`.

What the script gets (environment):
  GRIDFLEET_CONFIG          path of a JSON file holding `config`
  GRIDFLEET_CHECKPOINT_DIR  a directory for checkpoint files (in the job's workdir)
  GRIDFLEET_SEED            the job's seed
  GRIDFLEET_RESUME_FROM     when resuming: path of the restored checkpoint file (absent otherwise)
  GRIDFLEET_RESUME_STEP     when resuming: the step it was saved at
  GRIDFLEET_WORKDIR, GRIDFLEET_JOB_ID, GRIDFLEET_ATTEMPT, PYTHONUNBUFFERED=1 (unless `env` sets it), and
  PYTHONPATH starting with a folder holding `gridfleet_script_api.py` (= worker/script_api.py).

Line protocol (the script's stdout): a line containing `@gridfleet ` followed by one JSON object, e.g.
  @gridfleet {"report": {"step": 10, "loss": 0.3}}       metrics at a step (`step` required)
  @gridfleet {"progress": [10, 100]}                     done, total
  @gridfleet {"checkpoint": "ckpt/model.pt", "step": 10} store this file as the job's checkpoint
             (optional "name": the file name to restore it as; "move": true lets gridfleet delete it)
  @gridfleet {"result": {"loss": 0.25}}                  final metrics (default: the last report's)
  @gridfleet {"event": {"kind": "info", "message": "..."}}
Text before the marker on the same line, and every other line, goes to the job's output log unchanged.
A malformed protocol line fails the job (a typo should not silently drop a checkpoint).

Checkpoints: the file's bytes are read when its line is handled and stored with the job's checkpoint
store as {"step", "file", "name"}; the script must not change the file until then, or use
script_api.save_checkpoint(), which hands over a private copy. On resume the bytes are written back to
GRIDFLEET_CHECKPOINT_DIR/<name> before the script starts.

Stopping: when the job must stop (preempted, cancelled), the script's process group gets SIGTERM; it
should checkpoint and exit. After `grace_seconds` it gets SIGKILL (keep this below the worker's grace).
Exit status 0 -> success; anything else -> an error carrying the exit status and the tail of stderr;
running past `timeout_seconds` -> a TimeoutError. The script runs in its own session, so a Ctrl-C meant
for the worker does not reach it, and (on Linux) it is killed if the trainer process dies, so a kill -9
of a worker leaves no orphan training. Leftover processes of its group are killed when it exits.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MARKER = "@gridfleet "
CONFIG_FILE = "gridfleet_config.json"
CHECKPOINT_DIR = "checkpoints"
OUTBOX = ".outbox"  # script_api.save_checkpoint's private copies
HELPER_DIR = ".gridfleet_py"
HELPER_MODULE = "gridfleet_script_api.py"
STDERR_TAIL_LINES = 40
DRAIN_SECONDS = 5.0  # after exit, how long to wait for output still held by escaped grandchildren
_EOF = object()


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: list[str] | str = Field(
        description="argv list, or one string split like a shell would (no shell: no pipes, globs or $VARS)")
    config: dict[str, Any] = Field(default_factory=dict, description="handed to the script as JSON")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    cwd: str | None = Field(default=None, description="working directory (default: the worker's)")
    timeout_seconds: float | None = Field(default=None, gt=0)
    grace_seconds: float = Field(default=20.0, ge=0, le=3600)

    @field_validator("command")
    @classmethod
    def _argv(cls, value):
        if isinstance(value, str):
            try:
                value = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split the command string: {exc}") from None
        if not value or not value[0].strip():
            raise ValueError("command is empty; give the program and its arguments, "
                             "e.g. ['python', 'train.py'] or 'python train.py --fast'")
        return list(value)

    @field_validator("env", mode="before")
    @classmethod
    def _env_numbers_as_text(cls, value):
        if isinstance(value, dict):  # `OMP_NUM_THREADS: 4` in YAML is meant as "4"
            return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                    for k, v in value.items()}
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value):
        for name in value:
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"'{name}' is not a valid environment variable name")
            if name.startswith("GRIDFLEET_"):
                raise ValueError(f"'{name}': GRIDFLEET_* variables are set by gridfleet")
        return value

    @property
    def argv(self) -> list[str]:
        return list(self.command)


class CommandFailed(RuntimeError):
    """The script exited with a non-zero status (or broke the protocol)."""


class ProtocolError(CommandFailed):
    pass


# ---- the child process -------------------------------------------------------------------------
def _die_with_parent():
    """preexec_fn: on Linux, SIGKILL the script when the trainer process dies (even by kill -9)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen) -> bool:
    """True once the script exited, without reaping it: its pid (= process group id) stays reserved,
    so signalling the group afterwards cannot hit an unrelated process."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll() is not None
    return info is not None


def _read_stdout(stream, events: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            at = line.find(MARKER)
            if at < 0:
                _passthrough(sys.stdout, line)
                continue
            if line[:at].strip():
                _passthrough(sys.stdout, line[:at] + "\n")
            events.put(line[at + len(MARKER):].strip())
    finally:
        events.put(_EOF)


def _read_stderr(stream, tail: collections.deque) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        _passthrough(sys.stderr, line)
        text = line.rstrip("\r\n").rsplit("\r", 1)[-1]  # progress bars redraw with \r: keep the last
        if text.strip():
            tail.append(text)


def _passthrough(stream, text: str) -> None:
    try:
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


# ---- the trainer -----------------------------------------------------------------------------------
class _Run:
    """The state of one run of the script: handles protocol messages, all from the calling thread."""

    def __init__(self, cfg: Config, ctx, step: int):
        self.cfg, self.ctx = cfg, ctx
        self.step = step
        self.metrics: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.warned: set[str] = set()

    def handle(self, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError as exc:
            raise ProtocolError(f"bad protocol line (not JSON: {exc}): {MARKER}{payload[:500]}") from None
        if not isinstance(message, dict):
            raise ProtocolError(f"bad protocol line (not a JSON object): {MARKER}{payload[:500]}")
        try:
            self._dispatch(message)
        except ProtocolError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ProtocolError(f"bad protocol line ({exc}): {MARKER}{payload[:500]}") from None

    def _dispatch(self, message: dict[str, Any]) -> None:
        for key, value in message.items():
            if key == "report":
                if not isinstance(value, dict) or "step" not in value:
                    raise ValueError('"report" must be an object with a "step"')
                metrics = dict(value)
                self.step = int(metrics.pop("step"))
                self.metrics = metrics
                self.ctx.report(self.step, **metrics)
            elif key == "progress":
                done, total = (value["done"], value["total"]) if isinstance(value, dict) else value
                self.ctx.progress(float(done), float(total))
            elif key == "checkpoint":
                self._checkpoint(value, message)
            elif key == "result":
                if not isinstance(value, dict):
                    raise ValueError('"result" must be an object of final metrics')
                self.result = value
            elif key == "event":
                kind, text = (value.get("kind", "info"), value["message"]) if isinstance(value, dict) else value
                self.ctx.event(str(kind), str(text))
            elif key in ("step", "name", "move"):
                continue  # options of "checkpoint"
            elif key not in self.warned:
                self.warned.add(key)
                self.ctx.event("warning", f"command trainer: unknown protocol key '{key}' ignored")

    def _checkpoint(self, value: Any, message: dict[str, Any]) -> None:
        if isinstance(value, dict):
            message = {**message, **value}
            value = value["path"]
        path = Path(str(value))
        if not path.is_absolute():
            path = Path(self.cfg.cwd or os.getcwd()).expanduser() / path
        if not path.is_file():
            raise ProtocolError(f"checkpoint file '{path}' does not exist (was it written before the line?)")
        step = int(message.get("step", self.step))
        name = Path(str(message.get("name") or path.name)).name or "checkpoint.bin"
        self.ctx.save_checkpoint({"step": step, "file": path.read_bytes(), "name": name}, step=step)
        if message.get("move"):
            path.unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _prepare(cfg: Config, ctx) -> tuple[dict[str, str], int]:
    """Write the config file, the helper module and (when resuming) the checkpoint; build the env."""
    workdir = Path(ctx.workdir)
    checkpoints = workdir / CHECKPOINT_DIR
    shutil.rmtree(checkpoints / OUTBOX, ignore_errors=True)  # copies an earlier attempt never handed over
    checkpoints.mkdir(parents=True, exist_ok=True)
    config_path = workdir / CONFIG_FILE
    _write_atomically(config_path, json.dumps(cfg.config, indent=2, sort_keys=True).encode())
    helper = workdir / HELPER_DIR
    helper.mkdir(exist_ok=True)
    shutil.copyfile(Path(__file__).resolve().parent.parent / "script_api.py", helper / HELPER_MODULE)

    env = dict(os.environ)
    env.update(cfg.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(helper), env.get("PYTHONPATH", "")) if p)
    for name in [n for n in env if n.startswith("GRIDFLEET_")]:
        del env[name]  # tokens, URLs and an outer job's variables stay out of the script
    env.update({
        "GRIDFLEET_CONFIG": str(config_path),
        "GRIDFLEET_CHECKPOINT_DIR": str(checkpoints),
        "GRIDFLEET_SEED": str(ctx.seed),
        "GRIDFLEET_WORKDIR": str(workdir),
        "GRIDFLEET_JOB_ID": str(getattr(ctx, "job_id", "")),
        "GRIDFLEET_ATTEMPT": str(getattr(ctx, "attempt", "")),
    })
    step = 0
    state = ctx.load_checkpoint()
    if state is not None:
        step = int(state["step"])
        restored = checkpoints / (Path(str(state.get("name") or "checkpoint.bin")).name or "checkpoint.bin")
        _write_atomically(restored, state["file"])
        env["GRIDFLEET_RESUME_FROM"] = str(restored)
        env["GRIDFLEET_RESUME_STEP"] = str(step)
        ctx.event("info", f"command trainer: resuming from the checkpoint of step {step} ({restored.name})")
    return env, step


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def train(cfg: Config, ctx) -> dict:
    env, step = _prepare(cfg, ctx)
    if ctx.should_stop():
        return {"stopped_at": step}
    run = _Run(cfg, ctx, step)
    cwd = str(Path(cfg.cwd).expanduser()) if cfg.cwd else None
    try:
        proc = subprocess.Popen(
            cfg.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent(),
        )
    except OSError as exc:  # not found, not executable, bad cwd
        raise CommandFailed(f"cannot start {cfg.argv!r} (cwd {cwd or os.getcwd()}): {exc}") from None

    events: queue.Queue = queue.Queue()
    tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
    readers = [
        threading.Thread(target=_read_stdout, args=(proc.stdout, events), daemon=True, name="command-stdout"),
        threading.Thread(target=_read_stderr, args=(proc.stderr, tail), daemon=True, name="command-stderr"),
    ]
    for reader in readers:
        reader.start()
    started = time.monotonic()
    deadline = started + cfg.timeout_seconds if cfg.timeout_seconds else None
    reason: str | None = None  # "stop" | "timeout", once we asked the script to end
    term_at: float | None = None
    killed = False
    exited_at: float | None = None
    stdout_open = True
    checked = started
    try:
        while True:
            try:
                item = events.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is _EOF:
                stdout_open = False
            elif item is not None:
                run.handle(item)
                if time.monotonic() - checked < 0.1:
                    continue  # drain what is queued, but look at the clock even under a flood of lines
            now = checked = time.monotonic()
            if exited_at is None and _exited(proc):
                exited_at = now
                _signal_group(proc.pid, signal.SIGKILL)  # leftovers of its group; it is reaped below
            if exited_at is not None and (not stdout_open or now - exited_at > DRAIN_SECONDS):
                while stdout_open:  # a process that left the group still holds stdout: take what came
                    try:
                        item = events.get_nowait()
                    except queue.Empty:
                        break
                    if item is _EOF:
                        break
                    run.handle(item)
                break
            if exited_at is not None:
                continue
            if reason is None:
                if ctx.should_stop():
                    reason = "stop"
                elif deadline is not None and now > deadline:
                    reason = "timeout"
                if reason is not None:
                    term_at = now
                    _signal_group(proc.pid, signal.SIGTERM)
            elif not killed and now - term_at > cfg.grace_seconds:
                killed = True
                ctx.event("warning", f"command trainer: the script did not exit within {cfg.grace_seconds:g} s "
                                     "of SIGTERM; killed it")
                _signal_group(proc.pid, signal.SIGKILL)
    except BaseException:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    code = proc.wait()
    for reader in readers:
        reader.join(timeout=1.0)
    stderr = "\n".join(tail)

    if reason == "stop":
        return {"stopped_at": run.step}
    if reason == "timeout":
        raise TimeoutError(f"command {cfg.argv!r} ran longer than timeout_seconds={cfg.timeout_seconds:g} "
                           f"and {_describe_exit(code)}; last lines of its stderr:\n{stderr or '(none)'}")
    if code != 0:
        raise CommandFailed(f"command {cfg.argv!r} {_describe_exit(code)}; last lines of its stderr:\n"
                            f"{stderr or '(none)'}")
    if run.result is not None:
        return run.result
    return {**run.metrics, "step": run.step} if run.metrics else {}
