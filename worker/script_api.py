"""The Python side of the `command` trainer's protocol: a few calls for a user's own training script.

Pure standard library (no torch, no gridfleet imports), Python 3.8+. Under the command trainer the same
file is also importable as `gridfleet_script_api` from any interpreter (gridfleet puts a copy of it on the
script's PYTHONPATH), so a script running in another virtualenv or conda env can use it:

    import gridfleet_script_api as gf          # or, in gridfleet's own environment: from worker import script_api as gf

    cfg = gf.config()                          # the job's `config:` mapping
    start = 0
    if gf.load_checkpoint():                   # resuming: the path of the file saved last time
        start = restore(gf.load_checkpoint())
    for step in range(start, cfg["steps"]):
        if gf.should_stop():                   # preempted or cancelled (SIGTERM): save and leave
            gf.save_checkpoint(my_bytes(), step=step)
            raise SystemExit(0)
        ...
        gf.report(step + 1, loss=loss)
        gf.progress(step + 1, cfg["steps"])
    gf.result(loss=loss)

Run outside gridfleet, the calls still work: config() is {}, load_checkpoint() None, should_stop() False,
and the protocol lines simply appear on stdout. See docs/command_trainer.md for the line protocol itself.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
from typing import Any, Dict, Optional, Union

MARKER = "@gridfleet "
OUTBOX = ".outbox"  # under GRIDFLEET_CHECKPOINT_DIR: files handed to gridfleet, which deletes them once stored

_lock = threading.Lock()
_stop = threading.Event()
_handler_installed = False
_config_cache: Optional[Dict[str, Any]] = None
_last_step: Optional[int] = None
_sequence = 0


def _plain(value: Any) -> Any:
    """JSON-ready: numpy/torch scalars via .item(), NaN/inf as null, containers recursively."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a tensor/array with more than one element
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _emit(message: Dict[str, Any]) -> None:
    """One protocol line on fd 1, written whole after flushing whatever the script printed before."""
    line = (MARKER + json.dumps(_plain(message), allow_nan=False, default=str) + "\n").encode("utf-8")
    with _lock:
        for stream in (sys.stdout, sys.__stdout__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        view = memoryview(line)
        while view:
            written = os.write(1, view)
            view = view[written:]


def config() -> Dict[str, Any]:
    """The job's config (the command trainer's `config:` mapping), read from $GRIDFLEET_CONFIG."""
    global _config_cache
    if _config_cache is None:
        path = os.environ.get("GRIDFLEET_CONFIG")
        if path:
            with open(path, "r", encoding="utf-8") as handle:
                _config_cache = json.load(handle)
        else:
            _config_cache = {}
    return dict(_config_cache)


def seed() -> int:
    """The job's seed ($GRIDFLEET_SEED; 0 outside gridfleet)."""
    return int(os.environ.get("GRIDFLEET_SEED", "0"))


def report(step: int, **metrics: Any) -> None:
    """Metrics at `step` (numbers; NaN/inf become null). They show up as the job's curves."""
    global _last_step
    _last_step = int(step)
    _emit({"report": dict(metrics, step=int(step))})


def progress(done: float, total: float) -> None:
    """How far the job is, e.g. progress(step, steps)."""
    _emit({"progress": [float(done), float(total)]})


def event(kind: str, message: str) -> None:
    """A line for the job's event log (e.g. event("info", "switched to phase 2"))."""
    _emit({"event": {"kind": str(kind), "message": str(message)}})


def save_checkpoint(data: Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"],
                    step: Optional[int] = None, name: Optional[str] = None) -> None:
    """Hand a checkpoint to gridfleet: raw bytes, or the path of a file the script wrote.

    A private copy goes to $GRIDFLEET_CHECKPOINT_DIR/.outbox first, so the script may overwrite its own file
    right away. gridfleet stores it durably as the job's checkpoint at `step` (default: the last reported
    step); on resume the file comes back as $GRIDFLEET_CHECKPOINT_DIR/<name> (default: the file's own name,
    or `checkpoint.bin` for bytes) and load_checkpoint() returns that path.
    """
    global _sequence
    directory = os.path.join(os.environ.get("GRIDFLEET_CHECKPOINT_DIR") or os.getcwd(), OUTBOX)
    os.makedirs(directory, exist_ok=True)
    with _lock:
        _sequence += 1
        stem = os.path.join(directory, "%d-%d" % (os.getpid(), _sequence))
    temp, final = stem + ".part", stem + ".ckpt"
    if isinstance(data, (bytes, bytearray, memoryview)):
        with open(temp, "wb") as handle:
            handle.write(data)
        name = name or "checkpoint.bin"
    else:
        source = os.fspath(data)
        shutil.copyfile(source, temp)
        name = name or os.path.basename(source)
    os.replace(temp, final)
    message: Dict[str, Any] = {"checkpoint": final, "name": name, "move": True}
    step = _last_step if step is None else step
    if step is not None:
        message["step"] = int(step)
    _emit(message)


def load_checkpoint() -> Optional[str]:
    """The path of the last saved checkpoint file when this run resumes a job, else None."""
    path = os.environ.get("GRIDFLEET_RESUME_FROM")
    return path if path and os.path.exists(path) else None


def resume_step() -> Optional[int]:
    """The step the resumed checkpoint was saved at, else None."""
    value = os.environ.get("GRIDFLEET_RESUME_STEP")
    return int(value) if value else None


def _on_sigterm(_signum, _frame) -> None:
    _stop.set()


def should_stop() -> bool:
    """True once gridfleet asked the job to stop (SIGTERM): save a checkpoint and exit soon.

    The first call installs the SIGTERM handler; until then SIGTERM ends the script at once (as it does
    for scripts that never ask), which loses the work since the last checkpoint.
    """
    global _handler_installed
    if not _handler_installed:
        _handler_installed = True
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: the main thread must call should_stop() first
            pass
    return _stop.is_set()


def result(**metrics: Any) -> None:
    """The job's final metrics (the last call wins). Without one, the last reported metrics are used."""
    _emit({"result": metrics})
