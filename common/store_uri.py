"""Checkpoint store names and the layout every store shares, without importing any store.

Stores: `local` or `hf://owner/repo[@branch]`. A job's files live under `grid-<id>/job-<id>/` in every store,
and a Hub checkpoint pointer's URI is `hf://owner/repo/<path in the repo>`.
"""
from __future__ import annotations

import re

LOCAL = "local"
# Hub repo ids: owner and name of letters, digits, '-', '_' and '.' (no '--' or '..'), at most 96 each.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HF_RE = re.compile(rf"^hf://({_PART})/({_PART})(?:@([A-Za-z0-9._/-]{{1,200}}))?$")


def parse_hf_uri(uri: str) -> tuple[str, str]:
    """'hf://owner/repo[@branch]' -> (repo_id, branch); a ValueError says what is wrong."""
    if not uri.startswith("hf://"):
        raise ValueError(f"not an hf:// store URI: '{uri}'")
    match = _HF_RE.match(uri)
    if not match or "--" in uri or ".." in uri:
        raise ValueError(f"an hf:// store is hf://owner/repo[@branch] (letters, digits, '-', '_', '.'), got '{uri}'")
    owner, name, branch = match.groups()
    return f"{owner}/{name}", branch or "main"


def normalize_hf_uri(uri: str) -> str:
    """'hf://owner/repo' -> 'hf://owner/repo@main': one name per store, whether the branch is written or not."""
    repo_id, branch = parse_hf_uri(uri)
    return f"hf://{repo_id}@{branch}"


def job_folder(grid_id: int, job_id: int) -> str:
    """Where a job's files live, relative to a store's root (a directory or a Hub repo)."""
    return f"grid-{grid_id}/job-{job_id}"


def split_hf_pointer(uri: str) -> tuple[str, str]:
    """A Hub checkpoint pointer's 'hf://owner/repo/path' -> (repo_id, path in the repo)."""
    if not uri.startswith("hf://"):
        raise ValueError(f"the hub store cannot read checkpoint '{uri}'")
    parts = uri[len("hf://"):].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"a hub checkpoint URI is hf://owner/repo/path, got '{uri}'")
    return f"{parts[0]}/{parts[1]}", parts[2]


def check_store(uri: str) -> str:
    """Return `uri` when it names a store gridfleet can write to, else raise ValueError."""
    if uri == LOCAL:
        return uri
    if uri.startswith("hf://"):
        parse_hf_uri(uri)
        return uri
    raise ValueError(f"store must be 'local' or 'hf://owner/repo[@branch]', got '{uri}'")
