"""Engines, transactions and migrations for SQLite (embedded default) and Postgres (fleet)."""
from __future__ import annotations

import select
import sqlite3
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from sqlalchemy import Connection, Engine, create_engine, event, exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# libpq waits for a TCP connect without limit (minutes, for a host that drops packets); a request that
# cannot reach the database should fail soon enough to answer 503 and free its thread.
POSTGRES_CONNECT_TIMEOUT_S = 10

# What says "the database cannot be reached, is restarting or is busy right now": worth retrying later,
# never the caller's fault. psycopg's own (the hot path's raw connections) and SQLAlchemy's wrappers.
# psycopg's OperationalError covers connect refused, "the database system is shutting down / starting
# up" (CannotConnectNow), AdminShutdown, CrashShutdown, "server closed the connection unexpectedly",
# too many connections, deadlocks and serialization failures; InterfaceError a connection already closed.
_UNAVAILABLE = (
    psycopg.OperationalError, psycopg.InterfaceError,
    sqlite3.OperationalError,  # the SQLite hot path's raw connections: "database is locked" past the busy timeout
    sa_exc.OperationalError, sa_exc.InterfaceError,  # their DBAPI errors wrapped (SQLite's "database is locked" too)
    DisconnectionError,  # raised by a pool checkout check that found the connection dead
    sa_exc.TimeoutError,  # every pooled connection is busy
)


def is_unavailable(error: BaseException) -> bool:
    """True when `error` means the database is unreachable, restarting or busy: answer 503, retry later.
    Nothing here re-sends the failed statement (it may have committed): the client retries, and the
    attempt fence makes a repeated write harmless (docs/database_outages.md)."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True  # any driver error on a connection SQLAlchemy found closed or broken
    return isinstance(error, _UNAVAILABLE)


def normalize_url(url: str) -> str:
    """Accept plain postgres URLs and pick the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.get_backend_name() == "sqlite"


# No JIT: our statements are short OLTP ones, and a plan whose cost crosses jit_above_cost (any sort under the
# Queue's enable_sort=off, a count over a 100,000-job grid) spent 0.05-0.4 s compiling on every run.
NO_JIT = "-c jit=off"


def make_engine(url: str, **kwargs) -> Engine:
    url = normalize_url(url)
    if is_sqlite(url):
        return _sqlite_engine(url, **kwargs)
    url = _with_server_options(_with_connect_timeout(url), NO_JIT)
    # Survive a Postgres restart. pool_pre_ping would cost a round trip per transaction; the checkout
    # check below costs none (where poll() is missing, pre-ping it is).
    check_on_checkout = "pool_pre_ping" not in kwargs and hasattr(select, "poll")
    if not check_on_checkout:
        kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
    engine = create_engine(url, **kwargs)
    if check_on_checkout:
        event.listen(engine, "checkout", _refuse_closed_connection)
    return engine


def _with_server_options(url: URL, options: str) -> URL:
    """The URL with `options` (libpq's "-c name=value" settings) after any the URL names already, so that
    the pool's connections and AutocommitConnections both get them and a user's own (a search_path) stay."""
    named = url.query.get("options")
    named = " ".join(named) if isinstance(named, tuple) else named
    return url.update_query_dict({"options": f"{named} {options}" if named else options})


def _with_connect_timeout(url: str) -> URL:
    """The URL with libpq's connect_timeout unless it names one; in the URL, so that the pool's connections
    and AutocommitConnections (which connect with the URL's arguments) both get it."""
    parsed = make_url(url)
    if "connect_timeout" in parsed.query:
        return parsed
    return parsed.update_query_dict({"connect_timeout": str(POSTGRES_CONNECT_TIMEOUT_S)})


def _refuse_closed_connection(dbapi_conn, _record, _proxy) -> None:
    """Pool checkout: an idle connection has nothing to read unless the server ended it (a restart or a
    terminated backend sends an error and closes the socket). Then raise DisconnectionError: the pool
    discards the connection and checks out a fresh one, once. Nothing was sent on the dead connection,
    so whatever the caller does next runs exactly once. A connection that dies after this check fails
    the statement as before (never retried: it may have committed)."""
    if dbapi_conn.closed:
        raise DisconnectionError("pooled connection is closed")
    if _server_closed(dbapi_conn):
        raise DisconnectionError("the server closed this pooled connection")


def _server_closed(dbapi_conn) -> bool:
    """True when an idle connection's socket has something to read: the server's goodbye."""
    poller = select.poll()
    poller.register(dbapi_conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class AutocommitConnections:
    """Postgres only: raw psycopg connections in autocommit mode for statements that are their own
    transaction, without SQLAlchemy's per-statement work (pool checkout, execution context, result set-up:
    about half of a queue worker's CPU). psycopg prepares a statement after `prepare_threshold` runs.

    Thread-safe: a connection serves one caller at a time and goes back to an idle stack afterwards (not
    one per thread: the API server's worker threads come and go). A connection the server closed, or one
    left mid-statement, is replaced before anything is sent on it; a statement is never re-sent.
    All of them are closed by close() and by the engine's dispose().
    """

    def __init__(self, engine: Engine, prepare_threshold: int | None = 5, **connect_kwargs):
        self._dialect = engine.dialect
        url = engine.url  # what the engine's pool connects with; `options` go after the URL's own
        if "options" in connect_kwargs:
            url = _with_server_options(url, connect_kwargs.pop("options"))
        cargs, cparams = engine.dialect.create_connect_args(url)
        self._connect_args = cargs, {**cparams, **connect_kwargs, "autocommit": True,
                                     "prepare_threshold": prepare_threshold}
        self._idle: deque[psycopg.Connection] = deque()  # append/pop are atomic: no lock needed
        self._open: set[psycopg.Connection] = set()
        self._cursors: dict[psycopg.Connection, psycopg.Cursor] = {}  # each connection's kept cursor (cursor())
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        conn = self._checkout()
        try:
            yield conn
        finally:
            self._idle.append(conn)  # a broken one is dropped at its next checkout

    @contextmanager
    def cursor(self) -> Iterator[psycopg.Cursor]:
        """A checked-out connection's own cursor, made with the connection's first cursor() and kept with it;
        rows are tuples. conn.execute makes a new cursor (and its adapters' Transformer) for every statement,
        and dict rows a dict per row: a fifth of a worker's client CPU per claim+finish cycle with 16 worker
        processes (bench/README.md)."""
        conn = self._checkout()
        try:
            cursor = self._cursors.get(conn)
            if cursor is None:
                cursor = self._cursors[conn] = conn.cursor(row_factory=tuple_row)
            yield cursor
        finally:
            self._idle.append(conn)  # a broken one is dropped at its next checkout

    def _checkout(self) -> psycopg.Connection:
        while self._idle:
            try:
                conn = self._idle.pop()
            except IndexError:  # another thread took the last one
                break
            if self._usable(conn):
                return conn
            self._discard(conn)
        return self._new()  # a connect refused raises psycopg.OperationalError: see is_unavailable

    def _new(self) -> psycopg.Connection:
        cargs, cparams = self._connect_args
        conn = self._dialect.connect(*cargs, **cparams)
        self._open.add(conn)
        return conn

    @staticmethod
    def _usable(conn: psycopg.Connection) -> bool:
        if conn.closed or conn.pgconn.transaction_status != TransactionStatus.IDLE:  # conn.info: an object a call
            return False  # closed, broken, or interrupted mid-statement
        if hasattr(select, "poll"):
            return not _server_closed(conn)
        try:  # no poll(): one round trip, as pool_pre_ping
            conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def _discard(self, conn: psycopg.Connection) -> None:
        self._open.discard(conn)
        self._cursors.pop(conn, None)
        conn.close()

    def close(self) -> None:
        """Close every connection, idle or in use (one in use fails its statement). Later use opens new ones."""
        self._idle.clear()
        for conn in list(self._open):
            self._discard(conn)


def _sqlite_settings(dbapi_conn) -> None:
    # Let the caller emit BEGIN itself (pysqlite's own BEGIN is deferred): SQLAlchemy's "begin" event below,
    # SqliteConnections.transaction.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Yield `conn` inside BEGIN IMMEDIATE: committed when the caller's block ends, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteConnections:
    """SQLite only: raw sqlite3 connections for the queue's hot path, as AutocommitConnections are for
    Postgres: no pool checkout, no statement compile, no result set-up; sqlite3 keeps each SQL string
    prepared (its statement cache). Same settings as the engine's connections (WAL, busy timeout, foreign
    keys). Thread-safe the same way: a connection serves one caller at a time from an idle stack. An
    in-memory database is private to its connection, so there the engine's own pool is used instead.
    """

    def __init__(self, engine: Engine):
        self._engine = engine
        database = engine.url.database
        self._database = database if database and database != ":memory:" else None
        self._idle: deque[sqlite3.Connection] = deque()
        self._open: set[sqlite3.Connection] = set()
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction (the write lock up front), rows as sqlite3.Row: committed when the
        block ends, rolled back when it raises."""
        if self._database is None:
            yield from self._pooled_transaction()
            return
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._new()
        try:
            yield from _immediate(conn)
        finally:
            self._idle.append(conn)

    def _pooled_transaction(self) -> Iterator[sqlite3.Connection]:
        with self._engine.connect() as pooled:
            conn = pooled.connection.driver_connection
            row_factory, conn.row_factory = conn.row_factory, sqlite3.Row
            try:
                yield from _immediate(conn)
            finally:
                conn.row_factory = row_factory

    def _new(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._database, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        _sqlite_settings(conn)
        conn.row_factory = sqlite3.Row
        self._open.add(conn)
        return conn

    def close(self) -> None:
        """Close every connection (later use opens new ones)."""
        self._idle.clear()
        for conn in list(self._open):
            self._open.discard(conn)
            conn.close()


def _sqlite_engine(url: str, **kwargs) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("connect_args", {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        _sqlite_settings(dbapi_conn)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection):
        # Writers take the lock up front, so two claimers never both read then both write.
        immediate = conn.get_execution_options().get("gridfleet_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A short transaction that will write. On SQLite it starts with BEGIN IMMEDIATE."""
    with engine.connect() as conn:
        conn = conn.execution_options(gridfleet_write=True)
        with conn.begin():
            yield conn


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        with conn.begin():
            yield conn


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Create or upgrade the schema with Alembic (idempotent)."""
    from alembic import command

    if is_sqlite(url):
        database = make_url(normalize_url(url)).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)
