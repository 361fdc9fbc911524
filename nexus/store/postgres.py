"""PostgreSQL backend: the store for several Nexus nodes sharing one database.

Correctness comes from the database, not from this process: a new secret version is written
under a ``SELECT ... FOR UPDATE`` lock on the path's metadata row (created with
``INSERT ... ON CONFLICT DO NOTHING`` for the first version), the primary key forbids duplicate
versions, and ``replace_blobs`` is a single conditional ``UPDATE ... FROM unnest(...)``.
Transactions run at READ COMMITTED; serialization failures and deadlocks are retried a bounded
number of times. Schema migrations run in one transaction under an advisory lock, so nodes
starting together migrate once.

Connections: a small lock-guarded set of psycopg 3 connections (no extra dependency). The
statements and the operations themselves are shared with SQLite (:mod:`nexus.store.sql`).
"""

from __future__ import annotations

import contextlib
import random
import select
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from nexus.store import sql as shared
from nexus.store.base import BlobUpdate, StoreUnavailable

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]

DIALECT = shared.POSTGRES
DRIVER_ERRORS = shared.DriverErrors(
    "postgres",
    unavailable=(pg_errors.ReadOnlySqlTransaction, psycopg.OperationalError,
                 psycopg.InterfaceError),
    integrity=(psycopg.IntegrityError,), every=(psycopg.Error,))
STATEMENTS = shared.Statements.of(DIALECT)
MIGRATIONS = shared.migrations(DIALECT)
SCHEMA_VERSION = shared.SCHEMA_VERSION

MIGRATION_LOCK_KEY = 0x5350494B45_01
"""``pg_advisory_xact_lock`` key that serializes migrations between nodes ("SPIKE" 01)."""

STATE_CHANNEL = "spike_state"
"""The LISTEN/NOTIFY channel on which a changed state document's key is announced."""

_MAX_ATTEMPTS = 6
_CONNECT_TIMEOUT_S = 10
_POOL_WAIT_S = 30.0

_REPLACE_BLOBS = (
    "UPDATE records AS r SET generation = v.new_generation, blob = v.new_blob"
    " FROM unnest(%b::text[], %b::text[], %b::integer[], %b::integer[],"
    " %b::bytea[], %b::integer[], %b::bytea[])"
    " AS v(kind, path, version, expected_generation, expected_blob,"
    " new_generation, new_blob)"
    " WHERE r.kind = v.kind AND r.path = v.path AND r.version = v.version"
    " AND r.generation = v.expected_generation AND r.blob = v.expected_blob"
)


def _hung_up(conn: Conn) -> bool:
    """True if an idle connection is unusable (closed, or the server sent something/EOF).

    An idle connection has nothing to read unless the server terminated it (an error message
    then EOF) or sent an asynchronous notice; either way a fresh connection is the safe choice.
    """
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class _Connections:
    """A lock-guarded set of idle connections with an upper bound on open ones."""

    def __init__(self, dsn: str, max_size: int) -> None:
        self.dsn = dsn
        self._idle: list[Conn] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_size)
        self._closed = False

    def _connect(self) -> Conn:
        conn: Conn = psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S
        )
        return conn

    def _take_idle(self) -> Conn | None:
        """Pop a healthy idle connection, discarding ones the server has hung up on."""
        while True:
            with self._lock:
                if self._closed:
                    raise StoreUnavailable("store is closed")
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if not _hung_up(conn):
                return conn
            conn.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Conn]:
        """Borrow a connection (autocommit mode; use ``conn.transaction()`` for atomicity)."""
        if not self._slots.acquire(timeout=_POOL_WAIT_S):
            raise StoreUnavailable("postgres: no free database connection")
        try:
            conn = self._take_idle()
            if conn is None:
                conn = self._connect()
            try:
                yield conn
            finally:
                reusable = (
                    not conn.closed and not conn.broken
                    and conn.info.transaction_status == TransactionStatus.IDLE
                )
                with self._lock:
                    if reusable and not self._closed:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close idle connections; borrowed ones are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Listener:
    """A connection that LISTENs on :data:`STATE_CHANNEL` (used by one thread at a time)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: Conn | None = None

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            conn: Conn = psycopg.connect(self._dsn, autocommit=True,
                                         connect_timeout=_CONNECT_TIMEOUT_S)
            conn.execute(f"LISTEN {STATE_CHANNEL}")
            self._conn = conn
        return self._conn

    def wait(self, keys: Collection[str], timeout: float) -> bool:
        deadline = time.monotonic() + max(timeout, 0.0)
        try:
            conn = self._connection()
            while (left := deadline - time.monotonic()) > 0:
                for note in conn.notifies(timeout=left, stop_after=1):
                    if note.payload in keys:
                        return True
            return False
        except psycopg.Error:
            # The database went away: wait out the rest, reconnect next time. A reconnected
            # listener may have missed a notification, so the caller re-reads regardless.
            self.close()
            time.sleep(max(deadline - time.monotonic(), 0.0))
            return False

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


class PostgresStore(shared.SqlStore):
    """The PostgreSQL implementation of :class:`nexus.store.base.Store` (thread-safe)."""

    dialect = DIALECT
    sql = STATEMENTS
    notify_state = f"SELECT pg_notify('{STATE_CHANNEL}', %s)"

    def __init__(self, connections: _Connections) -> None:
        """Use :meth:`open`."""
        self._connections = connections
        self._listener: _Listener | None = None
        self._listener_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, dsn: str, *, max_connections: int = 8) -> PostgresStore:
        """Connect to ``dsn`` (a libpq connection string or URI) and apply pending migrations.

        Raises :class:`SchemaTooNew` if the database was migrated by a newer release and
        :class:`StoreUnavailable` if it cannot be reached.
        """
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        store = cls(_Connections(dsn, max_connections))
        try:
            store._write(store._migrate)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Close every connection."""
        self._connections.close()
        with self._listener_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    # ------------------------------------------------------------------ notifications

    def wait_for_state_change(self, keys: Collection[str], timeout: float) -> bool:
        """See :meth:`nexus.store.base.Store.wait_for_state_change`: one listening
        connection (LISTEN spike_state); a lost one is reopened on the next call."""
        with self._listener_lock:
            if self._listener is None:
                self._listener = _Listener(self._connections.dsn)
            listener = self._listener
        return listener.wait(keys, timeout)

    @staticmethod
    def _migrate(conn: Conn) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        shared.migrate(conn, STATEMENTS, MIGRATIONS)

    # ------------------------------------------------------------------ primitives

    def _write(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` in one transaction; retry serialization failures and deadlocks."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            with shared.translated(DRIVER_ERRORS), self._connections.connection() as conn:
                try:
                    with conn.transaction():
                        return fn(conn)
                except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected):
                    if attempt == _MAX_ATTEMPTS:
                        raise
            time.sleep(random.uniform(0.001, 0.005) * attempt)
        raise AssertionError("unreachable")

    def _snapshot(self, fn: Callable[[Conn], T]) -> T:
        """Several reads in one transaction (at READ COMMITTED each statement still sees
        its own snapshot: callers do not cross-check them)."""
        return self._write(fn)

    def _read(self, fn: Callable[[Conn], T]) -> T:
        """Run a single-statement read in autocommit mode (no BEGIN/COMMIT round trips)."""
        with shared.translated(DRIVER_ERRORS), self._connections.connection() as conn:
            return fn(conn)

    def _replace_rows(self, conn: shared.Connection, updates: Sequence[BlobUpdate]) -> int:
        ordered = sorted(updates, key=lambda u: u[:3])  # stable lock order across nodes
        params = (
            [u.kind for u in ordered],
            [u.path for u in ordered],
            [u.version for u in ordered],
            [u.expected_generation for u in ordered],
            [bytes(u.expected_blob) for u in ordered],
            [u.new_generation for u in ordered],
            [bytes(u.new_blob) for u in ordered],
        )
        return max(conn.execute(_REPLACE_BLOBS, params).rowcount, 0)
