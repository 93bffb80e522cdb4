"""API tokens: `gf_` + 32 random bytes (url-safe base64). Only the sha256 hex is ever stored.

Lookups go through a small in-process cache keyed by the hash, so the hot worker endpoints do not
query the tokens table on every request. A revoked token stops working within `ttl` seconds.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select

from common import schema as t
from common.db import read_tx, write_tx

ROLES = ("admin", "submit", "worker")
PREFIX = "gf_"
MAX_NAME = 100


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    role: str


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got '{role}'")
    return role


def create_token(engine: Engine, role: str, name: str | None = None) -> tuple[int, str]:
    """A new token; returns (id, token). The token itself is returned once and never stored."""
    check_role(role)
    token = new_token()
    token_id = _insert(engine, token_hash=hash_token(token), role=role, name=name or f"{role} token")
    return token_id, token


def ensure_token(engine: Engine, token: str, role: str, name: str) -> str:
    """Make sure `token` exists with `role`. Returns 'created', 'present' or 'revoked' (left revoked)."""
    check_role(role)
    token_hash = hash_token(token)
    with read_tx(engine) as conn:
        row = conn.execute(select(t.tokens.c.revoked).where(t.tokens.c.token_hash == token_hash)).first()
    if row is not None:
        return "revoked" if row.revoked else "present"
    _insert(engine, token_hash=token_hash, role=role, name=name)
    return "created"


def has_active(engine: Engine, role: str) -> bool:
    with read_tx(engine) as conn:
        return conn.execute(
            select(t.tokens.c.id).where(t.tokens.c.role == role, t.tokens.c.revoked.is_(False)).limit(1)
        ).first() is not None


def lookup(engine: Engine, token_hash: str) -> TokenInfo | None:
    with read_tx(engine) as conn:
        row = conn.execute(
            select(t.tokens.c.id, t.tokens.c.name, t.tokens.c.role)
            .where(t.tokens.c.token_hash == token_hash, t.tokens.c.revoked.is_(False))
        ).first()
    return TokenInfo(id=row.id, name=row.name, role=row.role) if row else None


def _insert(engine: Engine, token_hash: str, role: str, name: str) -> int:
    name = name.replace("\x00", "")[:MAX_NAME] or f"{role} token"
    with write_tx(engine) as conn:
        return conn.execute(
            insert(t.tokens)
            .values(name=name, role=role, token_hash=token_hash, created_at=time.time(), revoked=False)
            .returning(t.tokens.c.id)
        ).scalar_one()


class TokenCache:
    """hash -> TokenInfo for `ttl` seconds. Only valid tokens are cached (a new token works at once)."""

    def __init__(self, ttl: float = 5.0, max_entries: int = 10_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, TokenInfo]] = {}
        self._lock = threading.Lock()

    def get(self, token_hash: str, now: float | None = None) -> TokenInfo | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        if entry[0] < (time.monotonic() if now is None else now):
            self._entries.pop(token_hash, None)
            return None
        return entry[1]

    def put(self, token_hash: str, info: TokenInfo) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[token_hash] = (time.monotonic() + self.ttl, info)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
