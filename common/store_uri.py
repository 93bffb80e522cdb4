"""Checkpoint store names, checked without importing any store: `local` or `hf://owner/repo[@branch]`."""
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


def check_store(uri: str) -> str:
    """Return `uri` when it names a store gridfleet can write to, else raise ValueError."""
    if uri == LOCAL:
        return uri
    if uri.startswith("hf://"):
        parse_hf_uri(uri)
        return uri
    raise ValueError(f"store must be 'local' or 'hf://owner/repo[@branch]', got '{uri}'")
