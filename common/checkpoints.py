"""Checkpoint stores. `local:` keeps files under a directory: write temp, fsync, rename, keep the last K.

A checkpoint is one dict (nanoGPT style): whatever the trainer needs to resume exactly. The pointer a
store returns is what the job row records, and only after the file it names is durable.
"""
from __future__ import annotations

import io
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from common.store_uri import job_folder

CHECKPOINT_RE = re.compile(r"^ckpt-(\d{12})\.pt$")
# In a job's folder: the checkpoints the agent recorded on the job or is recording now, one name a line.
# Pruning keeps them even when newer ones are more than `keep`: while the API is away the child goes on
# saving, and the recorded one is what another worker resumes from.
PINNED = ".pinned"


@dataclass(frozen=True)
class StoreOptions:
    """How a worker reaches checkpoint stores (from Settings.store_options()). Tokens stay SecretStr, whose
    repr is masked, until the call into huggingface_hub."""

    default_store: str = "local"  # for jobs whose grid chose no store
    hub_endpoint: str | None = None
    hub_read_token: SecretStr | None = None
    hub_write_token: SecretStr | None = None
    upload_interval: float = 300.0

    def store_for(self, job: dict[str, Any]) -> str:
        return job.get("store") or self.default_store


def _serialize(state: Any) -> bytes:
    import torch  # only workers save checkpoints; the queue never imports torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def deserialize(data: bytes) -> Any:
    import torch

    # weights_only=False: checkpoints hold optimizer state, RNG states and replay buffers we wrote ourselves.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root).resolve()
        self.keep = max(1, keep)

    def job_dir(self, grid_id: int, job_id: int) -> Path:
        return self.root / job_folder(grid_id, job_id)

    def save(self, grid_id: int, job_id: int, step: int, state: Any) -> dict[str, Any]:
        """Write atomically and durably; return the pointer {uri, step, time}."""
        directory = self.job_dir(grid_id, job_id)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"ckpt-{step:012d}.pt"
        temp = directory / f".{final.name}.{os.getpid()}.tmp"
        with open(temp, "wb") as handle:
            handle.write(_serialize(state))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_dir(directory)
        self._prune(directory)
        return {"uri": f"local:{final}", "step": step, "time": time.time()}

    def _prune(self, directory: Path) -> None:
        files = sorted(p for p in directory.iterdir() if CHECKPOINT_RE.match(p.name))
        pinned = _pinned(directory)
        for old in files[: -self.keep]:
            if old.name not in pinned:
                old.unlink(missing_ok=True)

    def load(self, pointer: dict[str, Any]) -> Any:
        uri = pointer["uri"]
        if not uri.startswith("local:"):
            raise ValueError(f"the local store cannot read checkpoint '{uri}'")
        path = Path(uri[len("local:"):])
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint {path} is gone (was it written on another machine? use a shared or hf:// store)"
            )
        return deserialize(path.read_bytes())


def pin_checkpoints(pointers: list[dict[str, Any]]) -> None:
    """Keep these local checkpoints (of one job) from pruning, and no others beyond the newest `keep`."""
    paths = [Path(p["uri"][len("local:"):]) for p in pointers if p["uri"].startswith("local:")]
    if not paths:
        return
    directory = paths[0].parent
    temp = directory / f"{PINNED}.{os.getpid()}.tmp"
    temp.write_text("".join(f"{path.name}\n" for path in paths))
    os.replace(temp, directory / PINNED)


def _pinned(directory: Path) -> set[str]:
    try:
        return set((directory / PINNED).read_text().split())
    except FileNotFoundError:
        return set()
