"""PostgreSQL backend: the store for several Nexus nodes sharing one database.

Correctness comes from the database, not from this process: a new secret version is written
under a ``SELECT ... FOR UPDATE`` lock on the path's metadata row (created with
``INSERT ... ON CONFLICT DO NOTHING`` for the first version), the primary key forbids duplicate
versions, and ``replace_blobs`` is a single conditional ``UPDATE ... FROM unnest(...)``.
Transactions run at READ COMMITTED; serialization failures and deadlocks are retried a bounded
number of times. Schema migrations run in one transaction under an advisory lock, so nodes
starting together migrate once.

Connections: a small lock-guarded set of psycopg 3 connections (no extra dependency).
"""

from __future__ import annotations

import contextlib
import random
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from nexus.store.base import (
    ENVELOPE_MIN_BYTES,
    KIND_POLICY,
    KIND_SECRET,
    POLICY_VERSION,
    BlobUpdate,
    CasMismatch,
    GenerationMismatch,
    NotFound,
    RecordKey,
    RecordRow,
    ScanRow,
    SchemaTooNew,
    Seal,
    SecretMeta,
    SecretRow,
    StoreError,
    StoreUnavailable,
    VersionInfo,
    check_cas,
    check_limit,
    check_max_versions,
    check_metadata,
    check_nonempty_versions,
    check_unique_keys,
    header_generation,
    prune_bounds,
)

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: initial schema
    (
        """
        CREATE TABLE records (
            kind        TEXT COLLATE "C" NOT NULL,
            path        TEXT COLLATE "C" NOT NULL,
            version     INTEGER          NOT NULL,
            generation  INTEGER          NOT NULL,
            blob        BYTEA,
            created_at  DOUBLE PRECISION NOT NULL,
            deleted_at  DOUBLE PRECISION,
            destroyed   BOOLEAN          NOT NULL DEFAULT FALSE,
            CHECK ((blob IS NULL) = destroyed),
            PRIMARY KEY (kind, path, version)
        ) WITH (fillfactor = 85)
        """,
        """
        CREATE TABLE secret_meta (
            path            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
            current_version INTEGER          NOT NULL,
            oldest_version  INTEGER          NOT NULL,
            created_at      DOUBLE PRECISION NOT NULL,
            updated_at      DOUBLE PRECISION NOT NULL
        )
        """,
        """
        CREATE TABLE state (
            key   TEXT COLLATE "C" NOT NULL PRIMARY KEY,
            value TEXT             NOT NULL
        )
        """,
        """
        CREATE TABLE encryption_counts (
            generation INTEGER NOT NULL PRIMARY KEY,
            count      BIGINT  NOT NULL
        )
        """,
        """
        CREATE TABLE write_probe (
            id INTEGER          NOT NULL PRIMARY KEY CHECK (id = 1),
            at DOUBLE PRECISION NOT NULL
        )
        """,
    ),
)
"""Ordered schema steps; step ``i`` brings the schema from version ``i`` to ``i + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The newest schema version this code knows."""

MIGRATION_LOCK_KEY = 0x5350494B45_01
"""``pg_advisory_xact_lock`` key that serializes migrations between nodes ("SPIKE" 01)."""

_MAX_ATTEMPTS = 6
_CONNECT_TIMEOUT_S = 10
_POOL_WAIT_S = 30.0

_SCAN_NOT_IN_FIRST = (
    "SELECT kind, path, version, generation, blob"
    " FROM records WHERE blob IS NOT NULL AND generation <> %s"
    " ORDER BY kind, path, version LIMIT %s"
)
_SCAN_NOT_IN_NEXT = (
    "SELECT kind, path, version, generation, blob"
    " FROM records WHERE blob IS NOT NULL AND generation <> %s"
    " AND (kind, path, version) > (%s, %s, %s) ORDER BY kind, path, version LIMIT %s"
)
_SCAN_IN_FIRST = (
    "SELECT kind, path, version, generation, blob"
    " FROM records WHERE blob IS NOT NULL AND generation = %s"
    " ORDER BY kind, path, version LIMIT %s"
)
_SCAN_IN_NEXT = (
    "SELECT kind, path, version, generation, blob"
    " FROM records WHERE blob IS NOT NULL AND generation = %s"
    " AND (kind, path, version) > (%s, %s, %s) ORDER BY kind, path, version LIMIT %s"
)

# A blob whose envelope header (format byte 1, then the generation big-endian, 33 bytes at
# least: see nexus.crypto.envelope) does not name the generation in its column.
_MISMATCH = (
    "SELECT kind, path, version, generation, substring(blob from 1 for 5),"
    " length(blob) >= 33 FROM records WHERE blob IS NOT NULL AND (length(blob) < 33"
    " OR get_byte(blob, 0) <> 1 OR substring(blob from 2 for 4) <> int4send(generation))"
)
_MISMATCH_FIRST = _MISMATCH + " ORDER BY kind, path, version LIMIT %s"
_MISMATCH_NEXT = (_MISMATCH + " AND (kind, path, version) > (%s, %s, %s)"
                  " ORDER BY kind, path, version LIMIT %s")


def _record(row: tuple[Any, ...]) -> RecordRow:
    return RecordRow(
        kind=row[0], path=row[1], version=row[2], generation=row[3],
        blob=None if row[4] is None else bytes(row[4]),
        created_at=row[5], deleted_at=row[6], destroyed=bool(row[7]),
    )


def _secret(row: tuple[Any, ...]) -> SecretRow:
    return SecretRow(
        path=row[1], version=row[2], generation=row[3],
        blob=None if row[4] is None else bytes(row[4]),
        created_at=row[5], deleted_at=row[6], destroyed=bool(row[7]),
    )


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    """Map driver errors to store errors (operational problems -> StoreUnavailable)."""
    try:
        yield
    except (pg_errors.ReadOnlySqlTransaction, psycopg.OperationalError,
            psycopg.InterfaceError) as exc:
        raise StoreUnavailable(f"postgres: {exc}") from exc
    except psycopg.IntegrityError:
        raise
    except psycopg.Error as exc:
        raise StoreError(f"postgres: {exc}") from exc


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
        self._dsn = dsn
        self._idle: list[Conn] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_size)
        self._closed = False

    def _connect(self) -> Conn:
        conn: Conn = psycopg.connect(
            self._dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S
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


class PostgresStore:
    """The PostgreSQL implementation of :class:`nexus.store.base.Store` (thread-safe)."""

    def __init__(self, connections: _Connections) -> None:
        """Use :meth:`open`."""
        self._connections = connections

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
            store._run(store._migrate)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Close every connection."""
        self._connections.close()

    @staticmethod
    def _migrate(conn: Conn) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),"
            " version INTEGER NOT NULL)"
        )
        row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        found = 0 if row is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(found, SCHEMA_VERSION)
        for step in MIGRATIONS[found:]:
            for statement in step:
                conn.execute(statement)
        if found != SCHEMA_VERSION:
            conn.execute(
                "INSERT INTO schema_version (id, version) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )

    # ------------------------------------------------------------------ plumbing

    def _run(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` in one transaction; retry serialization failures and deadlocks."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            with _translate_errors(), self._connections.connection() as conn:
                try:
                    with conn.transaction():
                        return fn(conn)
                except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected):
                    if attempt == _MAX_ATTEMPTS:
                        raise
            time.sleep(random.uniform(0.001, 0.005) * attempt)
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[Conn], T]) -> T:
        """Run a single-statement read in autocommit mode (no BEGIN/COMMIT round trips)."""
        with _translate_errors(), self._connections.connection() as conn:
            return fn(conn)

    # ------------------------------------------------------------------ secrets

    def put_secret(self, path: str, *, cas: int | None, max_versions: int, now: float,
                   seal: Seal) -> int:
        """See :meth:`nexus.store.base.Store.put_secret`."""
        check_max_versions(max_versions)
        check_cas(cas)

        def tx(conn: Conn) -> int:
            select = (
                "SELECT current_version, oldest_version FROM secret_meta"
                " WHERE path = %s FOR UPDATE"
            )
            meta = conn.execute(select, (path,)).fetchone()
            if meta is None:
                conn.execute(
                    "INSERT INTO secret_meta (path, current_version, oldest_version,"
                    " created_at, updated_at) VALUES (%s, 0, 1, %s, %s)"
                    " ON CONFLICT (path) DO NOTHING",
                    (path, now, now),
                )
                meta = conn.execute(select, (path,)).fetchone()
                if meta is None:  # pragma: no cover - the row was just inserted or existed
                    raise StoreError(f"secret {path!r}: metadata row vanished")
            current, old_oldest = int(meta[0]), int(meta[1])
            newest = conn.execute(
                "SELECT max(version) FROM records WHERE kind = %s AND path = %s",
                (KIND_SECRET, path),
            ).fetchone()
            # Before anything is written or pruned: metadata that contradicts the
            # records would make this put fail, or prune versions it must keep.
            check_metadata(path, current, old_oldest,
                           None if newest is None or newest[0] is None else int(newest[0]))
            if cas is not None and cas != current:
                raise CasMismatch(cas, current)
            version = current + 1
            generation, blob = seal(version)
            conn.execute(
                "INSERT INTO records (kind, path, version, generation, blob, created_at,"
                " deleted_at, destroyed) VALUES (%s, %s, %s, %s, %s, %s, NULL, FALSE)",
                (KIND_SECRET, path, version, generation, bytes(blob), now),
            )
            oldest = prune_bounds(version, old_oldest, max_versions)
            conn.execute(
                "UPDATE secret_meta SET current_version = %s, oldest_version = %s,"
                " updated_at = %s WHERE path = %s",
                (version, oldest, now, path),
            )
            if oldest > old_oldest:
                conn.execute(
                    "DELETE FROM records WHERE kind = %s AND path = %s AND version < %s",
                    (KIND_SECRET, path, oldest),
                )
            return version

        return self._run(tx)

    def get_secret(self, path: str, version: int | None = None) -> SecretRow:
        """See :meth:`nexus.store.base.Store.get_secret`."""

        def tx(conn: Conn) -> tuple[Any, ...] | None:
            if version is None:
                return conn.execute(
                    "SELECT r.kind, r.path, r.version, r.generation, r.blob, r.created_at,"
                    " r.deleted_at, r.destroyed FROM secret_meta m JOIN records r"
                    " ON r.kind = %s AND r.path = m.path AND r.version = m.current_version"
                    " WHERE m.path = %s",
                    (KIND_SECRET, path),
                ).fetchone()
            return conn.execute(
                "SELECT kind, path, version, generation, blob, created_at, deleted_at,"
                " destroyed FROM records WHERE kind = %s AND path = %s AND version = %s",
                (KIND_SECRET, path, version),
            ).fetchone()

        row = self._read(tx)
        if row is None:
            what = "current version" if version is None else f"version {version}"
            raise NotFound(f"secret {path!r}: {what} not found")
        return _secret(row)

    def secret_meta(self, path: str) -> SecretMeta:
        """See :meth:`nexus.store.base.Store.secret_meta`."""

        def tx(conn: Conn) -> SecretMeta:
            meta = conn.execute(
                "SELECT current_version, oldest_version, created_at, updated_at"
                " FROM secret_meta WHERE path = %s",
                (path,),
            ).fetchone()
            if meta is None or meta[0] == 0:
                raise NotFound(f"secret {path!r} not found")
            rows = conn.execute(
                "SELECT version, created_at, deleted_at, destroyed FROM records"
                " WHERE kind = %s AND path = %s ORDER BY version",
                (KIND_SECRET, path),
            ).fetchall()
            # The row alone (at READ COMMITTED its two reads are not one snapshot).
            check_metadata(path, int(meta[0]), int(meta[1]), None)
            return SecretMeta(
                path=path, current_version=meta[0], oldest_version=meta[1],
                created_at=meta[2], updated_at=meta[3],
                versions=tuple(VersionInfo(r[0], r[1], r[2], bool(r[3])) for r in rows),
            )

        return self._run(tx)

    def list_secret_paths(self, prefix: str = "", *, after: str | None = None,
                          limit: int | None = None) -> list[str]:
        """See :meth:`nexus.store.base.Store.list_secret_paths`."""
        if limit is not None:
            check_limit(limit)
        sql = ("SELECT path FROM secret_meta WHERE path >= %s AND starts_with(path, %s)"
               " AND current_version > 0")
        params: list[Any] = [prefix, prefix]
        if after is not None:
            sql += " AND path > %s"
            params.append(after)
        sql += " ORDER BY path"  # COLLATE "C": byte order, as on SQLite
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)

        def tx(conn: Conn) -> list[str]:
            return [r[0] for r in conn.execute(sql, params).fetchall()]

        return self._read(tx)

    def _update_versions(self, path: str, versions: Sequence[int], sql: str,
                         extra: tuple[Any, ...]) -> int:
        def tx(conn: Conn) -> int:
            meta = conn.execute(
                "SELECT current_version FROM secret_meta WHERE path = %s", (path,)
            ).fetchone()
            if meta is None or meta[0] == 0:
                raise NotFound(f"secret {path!r} not found")
            targets = sorted(set(versions)) if versions else [int(meta[0])]
            cur = conn.execute(sql, (*extra, KIND_SECRET, path, targets))
            return max(cur.rowcount, 0)

        return self._run(tx)

    def delete_versions(self, path: str, versions: Sequence[int], now: float) -> int:
        """See :meth:`nexus.store.base.Store.delete_versions`."""
        return self._update_versions(
            path, versions,
            "UPDATE records SET deleted_at = %s WHERE kind = %s AND path = %s"
            " AND version = ANY(%s::integer[]) AND deleted_at IS NULL",
            (now,),
        )

    def undelete_versions(self, path: str, versions: Sequence[int]) -> int:
        """See :meth:`nexus.store.base.Store.undelete_versions`."""
        check_nonempty_versions(versions, "undelete")
        return self._update_versions(
            path, versions,
            "UPDATE records SET deleted_at = NULL WHERE kind = %s AND path = %s"
            " AND version = ANY(%s::integer[]) AND deleted_at IS NOT NULL AND NOT destroyed",
            (),
        )

    def destroy_versions(self, path: str, versions: Sequence[int]) -> int:
        """See :meth:`nexus.store.base.Store.destroy_versions`."""
        check_nonempty_versions(versions, "destroy")
        return self._update_versions(
            path, versions,
            "UPDATE records SET blob = NULL, destroyed = TRUE WHERE kind = %s AND path = %s"
            " AND version = ANY(%s::integer[]) AND NOT destroyed",
            (),
        )

    # ------------------------------------------------------------------ policies

    def put_policy(self, name: str, generation: int, blob: bytes, now: float) -> None:
        """See :meth:`nexus.store.base.Store.put_policy`."""

        def tx(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO records (kind, path, version, generation, blob, created_at,"
                " deleted_at, destroyed) VALUES (%s, %s, %s, %s, %s, %s, NULL, FALSE)"
                " ON CONFLICT (kind, path, version) DO UPDATE SET"
                " generation = excluded.generation, blob = excluded.blob,"
                " deleted_at = NULL, destroyed = FALSE",
                (KIND_POLICY, name, POLICY_VERSION, generation, bytes(blob), now),
            )

        self._run(tx)

    def get_policy(self, name: str) -> RecordRow:
        """See :meth:`nexus.store.base.Store.get_policy`."""

        def tx(conn: Conn) -> tuple[Any, ...] | None:
            return conn.execute(
                "SELECT kind, path, version, generation, blob, created_at, deleted_at,"
                " destroyed FROM records WHERE kind = %s AND path = %s AND version = %s",
                (KIND_POLICY, name, POLICY_VERSION),
            ).fetchone()

        row = self._read(tx)
        if row is None:
            raise NotFound(f"policy {name!r} not found")
        return _record(row)

    def list_policies(self) -> list[RecordRow]:
        """See :meth:`nexus.store.base.Store.list_policies`."""

        def tx(conn: Conn) -> list[RecordRow]:
            rows = conn.execute(
                "SELECT kind, path, version, generation, blob, created_at, deleted_at,"
                " destroyed FROM records WHERE kind = %s ORDER BY path",
                (KIND_POLICY,),
            ).fetchall()
            return [_record(r) for r in rows]

        return self._read(tx)

    def delete_policy(self, name: str) -> bool:
        """See :meth:`nexus.store.base.Store.delete_policy`."""

        def tx(conn: Conn) -> bool:
            cur = conn.execute(
                "DELETE FROM records WHERE kind = %s AND path = %s AND version = %s",
                (KIND_POLICY, name, POLICY_VERSION),
            )
            return cur.rowcount > 0

        return self._run(tx)

    # ------------------------------------------------------------------ rotation

    def count_by_generation(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.count_by_generation`."""

        def tx(conn: Conn) -> dict[int, int]:
            rows = conn.execute(
                "SELECT generation, count(*) FROM records WHERE blob IS NOT NULL"
                " GROUP BY generation"
            ).fetchall()
            return {int(g): int(n) for g, n in rows}

        return self._read(tx)

    def _scan(self, sql_first: str, sql_next: str, generation: int,
              after: RecordKey | None, limit: int) -> list[ScanRow]:
        check_limit(limit)

        def tx(conn: Conn) -> list[ScanRow]:
            if after is None:
                rows = conn.execute(sql_first, (generation, limit)).fetchall()
            else:
                rows = conn.execute(
                    sql_next, (generation, after.kind, after.path, after.version, limit)
                ).fetchall()
            return [ScanRow(r[0], r[1], r[2], r[3], bytes(r[4])) for r in rows]

        return self._read(tx)

    def scan_not_in_generation(self, target_generation: int, after: RecordKey | None,
                               limit: int) -> list[ScanRow]:
        """See :meth:`nexus.store.base.Store.scan_not_in_generation`."""
        return self._scan(_SCAN_NOT_IN_FIRST, _SCAN_NOT_IN_NEXT, target_generation, after, limit)

    def scan_generation(self, generation: int, after: RecordKey | None,
                        limit: int) -> list[ScanRow]:
        """See :meth:`nexus.store.base.Store.scan_generation`."""
        return self._scan(_SCAN_IN_FIRST, _SCAN_IN_NEXT, generation, after, limit)

    def replace_blobs(self, updates: Sequence[BlobUpdate], *,
                      state: tuple[str, str] | None = None) -> int:
        """See :meth:`nexus.store.base.Store.replace_blobs`."""
        if not updates:
            if state is not None:
                self.put_state(*state)
            return 0
        check_unique_keys(updates)
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

        def tx(conn: Conn) -> int:
            cur = conn.execute(
                "UPDATE records AS r SET generation = v.new_generation, blob = v.new_blob"
                " FROM unnest(%b::text[], %b::text[], %b::integer[], %b::integer[],"
                " %b::bytea[], %b::integer[], %b::bytea[])"
                " AS v(kind, path, version, expected_generation, expected_blob,"
                " new_generation, new_blob)"
                " WHERE r.kind = v.kind AND r.path = v.path AND r.version = v.version"
                " AND r.generation = v.expected_generation AND r.blob = v.expected_blob",
                params,
            )
            changed = max(cur.rowcount, 0)
            if state is not None:
                conn.execute(
                    "INSERT INTO state (key, value) VALUES (%s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    state,
                )
            return changed

        return self._run(tx)

    # ------------------------------------------------------------------ integrity

    def count_by_header_generation(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.count_by_header_generation`."""

        def tx(conn: Conn) -> dict[int, int]:
            rows = conn.execute(
                "SELECT substring(blob from 1 for 5), length(blob) >= %s, count(*)"
                " FROM records WHERE blob IS NOT NULL GROUP BY 1, 2",
                (ENVELOPE_MIN_BYTES,),
            ).fetchall()
            counts: dict[int, int] = {}
            for head, long_enough, n in rows:
                generation = header_generation(bytes(head), bool(long_enough))
                counts[generation] = counts.get(generation, 0) + int(n)
            return counts

        return self._read(tx)

    def generation_mismatches(self, after: RecordKey | None,
                              limit: int) -> list[GenerationMismatch]:
        """See :meth:`nexus.store.base.Store.generation_mismatches`."""
        check_limit(limit)

        def tx(conn: Conn) -> list[GenerationMismatch]:
            if after is None:
                rows = conn.execute(_MISMATCH_FIRST, (limit,)).fetchall()
            else:
                rows = conn.execute(
                    _MISMATCH_NEXT, (after.kind, after.path, after.version, limit)).fetchall()
            return [GenerationMismatch(r[0], r[1], r[2], int(r[3]),
                                       header_generation(bytes(r[4]), bool(r[5])))
                    for r in rows]

        return self._read(tx)

    def fix_generation_cells(self, mismatches: Sequence[GenerationMismatch]) -> int:
        """See :meth:`nexus.store.base.Store.fix_generation_cells`."""
        # The generation column is a signed 32-bit integer: a header naming a larger
        # generation (none was ever created) is left alone.
        fixes = [m for m in mismatches if 0 < m.header < 2**31]
        if not fixes:
            return 0

        def tx(conn: Conn) -> int:
            changed = 0
            for m in fixes:
                cur = conn.execute(
                    "UPDATE records SET generation = %s WHERE kind = %s AND path = %s"
                    " AND version = %s AND generation = %s AND blob IS NOT NULL"
                    " AND length(blob) >= 33 AND get_byte(blob, 0) = 1"
                    " AND substring(blob from 2 for 4) = int4send(%s::integer)",
                    (m.header, m.kind, m.path, m.version, m.cell, m.header),
                )
                changed += max(cur.rowcount, 0)
            return changed

        return self._run(tx)

    # ------------------------------------------------------------------ state

    def get_state(self, key: str) -> str | None:
        """See :meth:`nexus.store.base.Store.get_state`."""

        def tx(conn: Conn) -> str | None:
            row = conn.execute("SELECT value FROM state WHERE key = %s", (key,)).fetchone()
            return None if row is None else str(row[0])

        return self._read(tx)

    def put_state(self, key: str, value: str) -> None:
        """See :meth:`nexus.store.base.Store.put_state`."""

        def tx(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO state (key, value) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        self._run(tx)

    def swap_state(self, key: str, expected: str | None, value: str) -> bool:
        """See :meth:`nexus.store.base.Store.swap_state`."""

        def tx(conn: Conn) -> bool:
            if expected is None:
                cur = conn.execute(
                    "INSERT INTO state (key, value) VALUES (%s, %s)"
                    " ON CONFLICT (key) DO NOTHING",
                    (key, value),
                )
            else:
                cur = conn.execute(
                    "UPDATE state SET value = %s WHERE key = %s AND value = %s",
                    (value, key, expected),
                )
            return cur.rowcount == 1

        return self._run(tx)

    def delete_state(self, key: str) -> None:
        """See :meth:`nexus.store.base.Store.delete_state`."""

        def tx(conn: Conn) -> None:
            conn.execute("DELETE FROM state WHERE key = %s", (key,))

        self._run(tx)

    # ------------------------------------------------------------------ counters

    def add_encryptions(self, generation: int, n: int) -> None:
        """See :meth:`nexus.store.base.Store.add_encryptions`."""
        if n == 0:
            return

        def tx(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO encryption_counts (generation, count) VALUES (%s, %s)"
                " ON CONFLICT (generation)"
                " DO UPDATE SET count = encryption_counts.count + excluded.count",
                (generation, n),
            )

        self._run(tx)

    def encryption_counts(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.encryption_counts`."""

        def tx(conn: Conn) -> dict[int, int]:
            rows = conn.execute("SELECT generation, count FROM encryption_counts").fetchall()
            return {int(g): int(n) for g, n in rows}

        return self._read(tx)

    # ------------------------------------------------------------------ housekeeping

    def is_empty(self) -> bool:
        """See :meth:`nexus.store.base.Store.is_empty`."""

        def tx(conn: Conn) -> bool:
            return conn.execute("SELECT 1 FROM records LIMIT 1").fetchone() is None

        return self._read(tx)

    def check_writable(self) -> None:
        """See :meth:`nexus.store.base.Store.check_writable`."""

        def tx(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO write_probe (id, at) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                (time.time(),),
            )

        self._run(tx)
