"""The hot path's raw Postgres connections (common/db.py AutocommitConnections): each connection keeps one
cursor for its statements, and a connection the server ended is replaced, with a new cursor, before anything
is sent on it."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from common.db import AutocommitConnections, _server_closed, make_engine

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


def _backend(cursor) -> int:
    return cursor.execute("SELECT pg_backend_pid() AS pid").fetchone()[0]


def test_a_connection_keeps_its_cursor_and_a_dead_one_is_replaced_with_a_new_cursor(db_url):
    engine = make_engine(db_url)
    connections = AutocommitConnections(engine)
    try:
        with connections.cursor() as first:
            pid = _backend(first)
        with connections.cursor() as again:
            assert again is first and _backend(again) == pid  # the same connection, its cursor kept
        with engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        idle, deadline = connections._idle[-1], time.monotonic() + 30
        while not _server_closed(idle):  # until the ended backend's goodbye has arrived
            assert time.monotonic() < deadline, "the terminated backend never closed its connection"
            time.sleep(0.01)
        with connections.cursor() as fresh:
            assert fresh is not first and _backend(fresh) != pid  # nothing was sent on the ended connection
        assert len(connections._open) == 1 and len(connections._cursors) == 1  # the dead one and its cursor gone
    finally:
        connections.close()
        engine.dispose()
    assert not connections._cursors
