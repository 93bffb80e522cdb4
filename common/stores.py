"""Reading a checkpoint from whichever store its pointer names. Above both stores, so that neither
imports the other: checkpoints.py (local) knows nothing of the Hub, hub_store.py builds on it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.checkpoints import LocalStore, StoreOptions
from common.store_uri import split_hf_pointer


def load_checkpoint(pointer: dict[str, Any], local_root: str | Path, options: StoreOptions) -> Any:
    """The checkpoint a job row points to, from whichever store wrote it (local copy first)."""
    uri = pointer["uri"]
    if uri.startswith("hf://"):
        from common.hub_store import HubStore  # huggingface_hub only where a Hub checkpoint is read

        repo_id, _ = split_hf_pointer(uri)
        store = HubStore(f"hf://{repo_id}", local_root, endpoint=options.hub_endpoint,
                         read_token=options.hub_read_token or options.hub_write_token)
        return store.load(pointer)
    return LocalStore(local_root).load(pointer)
