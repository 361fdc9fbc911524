"""SQLite backend: the embedded default store.

Design:

- WAL journal with ``synchronous=FULL``: a commit is durable when it returns, and readers never
  block the writer nor the other way round.
- One writer connection guarded by a ``threading.Lock``; every write is one ``BEGIN IMMEDIATE``
  transaction, so concurrent writers (threads here, or another process through the busy
  timeout) are serialized and a check-and-set can never lose an update.
- One reader connection per thread (``PRAGMA query_only``), so reads do not queue behind writes.
- One process per database: an exclusive ``flock`` on ``<file>.lock`` refuses a second Nexus
  (SQLite is the single-node store; several nodes share PostgreSQL).
- Secret reads are served from a small cache of *ciphertext* rows (:class:`RowCache`). Every
  write transaction through this store invalidates it, and the lock above keeps other writers
  out, so a cached row is never older than the last commit. It exists because each sqlite3
  call releases the GIL: under concurrent requests those hand-offs, not SQLite, were the cost
  of a hot read (docs/benchmarks.md).
- The database file (and therefore its ``-wal``/``-shm`` companions, which SQLite creates with
  the main file's permissions) is mode 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: initial schema
    (
        """
        CREATE TABLE records (
            kind        TEXT    NOT NULL,
            path        TEXT    NOT NULL,
            version     INTEGER NOT NULL,
            generation  INTEGER NOT NULL,
            blob        BLOB,
            created_at  REAL    NOT NULL,
            deleted_at  REAL,
            destroyed   INTEGER NOT NULL DEFAULT 0 CHECK (destroyed IN (0, 1)),
            CHECK ((blob IS NULL) = (destroyed = 1)),
            PRIMARY KEY (kind, path, version)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE secret_meta (
            path            TEXT    NOT NULL PRIMARY KEY,
            current_version INTEGER NOT NULL,
            oldest_version  INTEGER NOT NULL,
            created_at      REAL    NOT NULL,
            updated_at      REAL    NOT NULL
        )
        """,
        """
        CREATE TABLE state (
            key   TEXT NOT NULL PRIMARY KEY,
            value TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE encryption_counts (
            generation INTEGER NOT NULL PRIMARY KEY,
            count      INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE write_probe (
            id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
            at REAL    NOT NULL
        )
        """,
    ),
)
"""Ordered schema steps; step ``i`` brings the schema from version ``i`` to ``i + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The newest schema version this code knows."""

_SCAN_NOT_IN_FIRST = (
    "SELECT kind, path, version, generation, blob"
    " FROM records WHERE blob IS NOT NULL AND generation != ?"
    " ORDER BY kind, path, version LIMIT ?"
)
_SCAN_NOT_IN_NEXT = (
    "SELECT kind, path, version, generation, blob"
    " FROM records WHERE blob IS NOT NULL AND generation != ?"
    " AND (kind, path, version) > (?, ?, ?) ORDER BY kind, path, version LIMIT ?"
)
_SCAN_IN_FIRST = (
    "SELECT kind, path, version, generation, blob"
    " FROM records WHERE blob IS NOT NULL AND generation = ?"
    " ORDER BY kind, path, version LIMIT ?"
)
_SCAN_IN_NEXT = (
    "SELECT kind, path, version, generation, blob"
    " FROM records WHERE blob IS NOT NULL AND generation = ?"
    " AND (kind, path, version) > (?, ?, ?) ORDER BY kind, path, version LIMIT ?"
)
# A blob whose envelope header (format byte 1, then the generation big-endian, 33 bytes at
# least: see nexus.crypto.envelope) does not name the generation in its column.
_MISMATCH = (
    "SELECT kind, path, version, generation, substr(blob, 1, 5), length(blob) >= 33"
    " FROM records WHERE blob IS NOT NULL AND (length(blob) < 33"
    " OR substr(blob, 1, 1) != x'01' OR hex(substr(blob, 2, 4)) != printf('%08X', generation))"
)
_MISMATCH_FIRST = _MISMATCH + " ORDER BY kind, path, version LIMIT ?"
_MISMATCH_NEXT = (_MISMATCH + " AND (kind, path, version) > (?, ?, ?)"
                  " ORDER BY kind, path, version LIMIT ?")
_BUSY_TIMEOUT_S = 10.0

ROW_CACHE_ENTRIES = 4096
ROW_CACHE_BYTES = 16 * 1024 * 1024
ROW_CACHE_MAX_ROW_BYTES = 64 * 1024


class RowCache:
    """Recently read secret rows (ciphertext only), valid for one write epoch.

    The store bumps its epoch after every write transaction; entries carry the epoch they
    were read in and the cache drops everything when a newer epoch arrives. A reader must
    take the epoch *before* its SELECT, so a row read before a commit is never filed under
    the epoch that follows it. Bounded by entries and bytes (big rows are not cached);
    eviction is oldest-first. Thread-safe.
    """

    def __init__(self, max_entries: int = ROW_CACHE_ENTRIES, max_bytes: int = ROW_CACHE_BYTES,
                 max_row_bytes: int = ROW_CACHE_MAX_ROW_BYTES) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_row_bytes = max_row_bytes
        self._lock = threading.Lock()
        self._epoch = -1
        self._rows: dict[tuple[str, int | None], SecretRow] = {}
        self._bytes = 0

    def get(self, key: tuple[str, int | None], epoch: int) -> SecretRow | None:
        if epoch != self._epoch:
            return None
        return self._rows.get(key)  # this table's rows are of ``epoch`` or newer

    def put(self, key: tuple[str, int | None], epoch: int, row: SecretRow) -> None:
        size = len(row.blob or b"") + len(row.path)
        if self._max_entries <= 0 or size > self._max_row_bytes:
            return
        with self._lock:
            if epoch != self._epoch:
                if epoch < self._epoch:
                    return  # read before a write that has since committed
                # A new table first, the epoch second: ``get`` reads them in the other
                # order without the lock, so it never pairs the new epoch with old rows.
                self._rows = {}
                self._bytes = 0
                self._epoch = epoch
            old = self._rows.pop(key, None)
            if old is not None:
                self._bytes -= len(old.blob or b"") + len(old.path)
            while self._rows and (len(self._rows) >= self._max_entries
                                  or self._bytes + size > self._max_bytes):
                oldest = next(iter(self._rows))
                gone = self._rows.pop(oldest)
                self._bytes -= len(gone.blob or b"") + len(gone.path)
            self._rows[key] = row
            self._bytes += size

    def __len__(self) -> int:
        return len(self._rows)


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


def _prefix_upper_bound(prefix: str) -> str | None:
    """Smallest string greater than every string starting with ``prefix`` (None: unbounded)."""
    if not prefix:
        return None
    last = ord(prefix[-1])
    if last >= 0x10FFFF or 0xD7FF <= last <= 0xDFFF:
        return None
    return prefix[:-1] + chr(last + 1)


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    """Map driver errors to store errors (operational problems -> StoreUnavailable)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(f"sqlite: {exc}") from exc
    except sqlite3.IntegrityError:
        raise
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"sqlite: {exc}") from exc


def _secure_file(path: str, *, create: bool = True) -> None:
    """Create ``path`` with mode 0600 if missing; tighten it (and WAL companions) otherwise.

    Call with ``create=False`` once a connection is open: opening and closing the
    database file from this process would drop every POSIX lock SQLite holds on it
    (they are per process, per file), and another process closing its connection
    could then delete the WAL under us.
    """
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(name).st_mode) != 0o600:
                os.chmod(name, 0o600)


def _lock_database(path: str) -> int:
    """Take the exclusive lock that admits one store (one Nexus) per database file.

    A separate ``<file>.lock`` with ``flock``: SQLite's own POSIX locks on the database
    are per process and must not be touched (see :func:`_secure_file`). The kernel drops
    the lock when the process dies, so a crash never leaves it behind.
    """
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreUnavailable(f"sqlite: cannot open the lock file {lock_path}: "
                               f"{exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreUnavailable(
            f"sqlite: {path} is in use by another process (it holds {lock_path}); one "
            "Nexus per SQLite database — several nodes need the postgres store") from None
    except OSError as exc:
        os.close(fd)
        raise StoreUnavailable(f"sqlite: cannot lock {lock_path}: {exc.strerror}") from None
    return fd


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
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
                "INSERT INTO schema_version (id, version) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteStore:
    """The SQLite implementation of :class:`nexus.store.base.Store` (thread-safe)."""

    def __init__(self, path: str, writer: sqlite3.Connection, lock_fd: int = -1) -> None:
        """Use :meth:`open`; this constructor takes an already migrated writer connection
        (and the descriptor holding the database's lock file, closed by :meth:`close`)."""
        self._path = path
        self._writer = writer
        self._lock_fd = lock_fd
        self._epoch = 0
        self._rows = RowCache()
        self._write_lock = threading.Lock()
        self._readers_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SqliteStore:
        """Open (creating if needed) the database at ``path`` and apply pending migrations.

        Raises :class:`SchemaTooNew` if the file was written by a newer release.
        """
        spath = os.fspath(path)
        if spath == ":memory:" or spath.startswith("file:"):
            raise ValueError("SqliteStore needs a file path (no :memory: or URI)")
        lock_fd = _lock_database(spath)
        try:
            return cls._open_locked(spath, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, spath: str, lock_fd: int) -> SqliteStore:
        with _translate_errors():
            _secure_file(spath)
            writer = cls._connect(spath)
            try:
                mode = writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"sqlite: cannot switch {spath} to WAL (got {mode})")
                _migrate(writer)
            except BaseException:
                writer.close()
                raise
        _secure_file(spath, create=False)
        return cls(spath, writer, lock_fd)

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def close(self) -> None:
        """Close the writer and every reader connection."""
        with self._write_lock, self._readers_lock:
            if self._closed:
                return
            self._closed = True
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._writer.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = -1

    @property
    def path(self) -> Path:
        """Location of the database file."""
        return Path(self._path)

    # ------------------------------------------------------------------ plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("store is closed")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction on the writer connection."""
        with self._write_lock, _translate_errors():
            self._check_open()
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                # After the commit (or rollback): cached rows read before it are now stale.
                self._epoch += 1

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._readers_lock:
            self._check_open()
            conn = self._connect(self._path)
            conn.execute("PRAGMA query_only = ON")
            self._readers.append(conn)
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one consistent snapshot) on this thread's reader."""
        with _translate_errors():
            self._check_open()
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read_one(self) -> Iterator[sqlite3.Connection]:
        """For a single SELECT: one statement is its own consistent snapshot in SQLite,
        so the BEGIN/COMMIT round trip of :meth:`_read` is skipped (hot: every get)."""
        with _translate_errors():
            self._check_open()
            yield self._reader()

    # ------------------------------------------------------------------ secrets

    def put_secret(self, path: str, *, cas: int | None, max_versions: int, now: float,
                   seal: Seal) -> int:
        """See :meth:`nexus.store.base.Store.put_secret`."""
        check_max_versions(max_versions)
        check_cas(cas)
        with self._write() as conn:
            meta = conn.execute(
                "SELECT current_version, oldest_version FROM secret_meta WHERE path = ?", (path,)
            ).fetchone()
            current = 0 if meta is None else int(meta[0])
            old_oldest = 1 if meta is None else int(meta[1])
            newest = conn.execute(
                "SELECT max(version) FROM records WHERE kind = ? AND path = ?",
                (KIND_SECRET, path),
            ).fetchone()[0]
            # Before anything is written or pruned: metadata that contradicts the
            # records would make this put fail, or prune versions it must keep.
            check_metadata(path, current, old_oldest, newest)
            if cas is not None and cas != current:
                raise CasMismatch(cas, current)
            version = current + 1
            generation, blob = seal(version)
            conn.execute(
                "INSERT INTO records (kind, path, version, generation, blob, created_at,"
                " deleted_at, destroyed) VALUES (?, ?, ?, ?, ?, ?, NULL, 0)",
                (KIND_SECRET, path, version, generation, bytes(blob), now),
            )
            oldest = prune_bounds(version, old_oldest, max_versions)
            if meta is None:
                conn.execute(
                    "INSERT INTO secret_meta (path, current_version, oldest_version,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (path, version, oldest, now, now),
                )
            else:
                conn.execute(
                    "UPDATE secret_meta SET current_version = ?, oldest_version = ?,"
                    " updated_at = ? WHERE path = ?",
                    (version, oldest, now, path),
                )
                conn.execute(
                    "DELETE FROM records WHERE kind = ? AND path = ? AND version < ?",
                    (KIND_SECRET, path, oldest),
                )
            return version

    def get_secret(self, path: str, version: int | None = None) -> SecretRow:
        """See :meth:`nexus.store.base.Store.get_secret`."""
        key = (path, version)
        epoch = self._epoch  # before the SELECT (see RowCache)
        cached = self._rows.get(key, epoch)
        if cached is not None:
            self._check_open()
            return cached
        with self._read_one() as conn:
            if version is None:
                row = conn.execute(
                    "SELECT r.kind, r.path, r.version, r.generation, r.blob, r.created_at,"
                    " r.deleted_at, r.destroyed FROM secret_meta m JOIN records r"
                    " ON r.kind = ? AND r.path = m.path AND r.version = m.current_version"
                    " WHERE m.path = ?",
                    (KIND_SECRET, path),
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT kind, path, version, generation, blob, created_at, deleted_at,"
                    " destroyed FROM records"
                    " WHERE kind = ? AND path = ? AND version = ?",
                    (KIND_SECRET, path, version),
                ).fetchone()
        if row is None:
            what = "current version" if version is None else f"version {version}"
            raise NotFound(f"secret {path!r}: {what} not found")
        found = _secret(row)
        self._rows.put(key, epoch, found)
        return found

    def secret_meta(self, path: str) -> SecretMeta:
        """See :meth:`nexus.store.base.Store.secret_meta`."""
        with self._read() as conn:
            meta = conn.execute(
                "SELECT current_version, oldest_version, created_at, updated_at"
                " FROM secret_meta WHERE path = ?",
                (path,),
            ).fetchone()
            if meta is None:
                raise NotFound(f"secret {path!r} not found")
            rows = conn.execute(
                "SELECT version, created_at, deleted_at, destroyed FROM records"
                " WHERE kind = ? AND path = ? ORDER BY version",
                (KIND_SECRET, path),
            ).fetchall()
        # The row alone (its two reads are not one snapshot, so no cross-check here).
        check_metadata(path, int(meta[0]), int(meta[1]), None)
        return SecretMeta(
            path=path, current_version=meta[0], oldest_version=meta[1],
            created_at=meta[2], updated_at=meta[3],
            versions=tuple(VersionInfo(r[0], r[1], r[2], bool(r[3])) for r in rows),
        )

    def list_secret_paths(self, prefix: str = "", *, after: str | None = None,
                          limit: int | None = None) -> list[str]:
        """See :meth:`nexus.store.base.Store.list_secret_paths`."""
        if limit is not None:
            check_limit(limit)
        upper = _prefix_upper_bound(prefix)
        # BINARY collation: paths compare by their UTF-8 bytes, as on PostgreSQL ("C").
        sql = "SELECT path FROM secret_meta WHERE path >= ? AND substr(path, 1, ?) = ?"
        params: list[Any] = [prefix, len(prefix), prefix]
        if upper is not None:
            sql += " AND path < ?"
            params.append(upper)
        if after is not None:
            sql += " AND path > ?"
            params.append(after)
        sql += " ORDER BY path"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [r[0] for r in rows]

    def _update_versions(self, path: str, versions: Sequence[int], sql: str,
                         extra: tuple[Any, ...]) -> int:
        with self._write() as conn:
            meta = conn.execute(
                "SELECT current_version FROM secret_meta WHERE path = ?", (path,)
            ).fetchone()
            if meta is None:
                raise NotFound(f"secret {path!r} not found")
            targets = sorted(set(versions)) if versions else [int(meta[0])]
            cur = conn.executemany(
                sql, [(*extra, KIND_SECRET, path, v) for v in targets]
            )
            return max(cur.rowcount, 0)

    def delete_versions(self, path: str, versions: Sequence[int], now: float) -> int:
        """See :meth:`nexus.store.base.Store.delete_versions`."""
        return self._update_versions(
            path, versions,
            "UPDATE records SET deleted_at = ? WHERE kind = ? AND path = ? AND version = ?"
            " AND deleted_at IS NULL",
            (now,),
        )

    def undelete_versions(self, path: str, versions: Sequence[int]) -> int:
        """See :meth:`nexus.store.base.Store.undelete_versions`."""
        check_nonempty_versions(versions, "undelete")
        return self._update_versions(
            path, versions,
            "UPDATE records SET deleted_at = NULL WHERE kind = ? AND path = ? AND version = ?"
            " AND deleted_at IS NOT NULL AND destroyed = 0",
            (),
        )

    def destroy_versions(self, path: str, versions: Sequence[int]) -> int:
        """See :meth:`nexus.store.base.Store.destroy_versions`."""
        check_nonempty_versions(versions, "destroy")
        return self._update_versions(
            path, versions,
            "UPDATE records SET blob = NULL, destroyed = 1 WHERE kind = ? AND path = ?"
            " AND version = ? AND destroyed = 0",
            (),
        )

    # ------------------------------------------------------------------ policies

    def put_policy(self, name: str, generation: int, blob: bytes, now: float) -> None:
        """See :meth:`nexus.store.base.Store.put_policy`."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO records (kind, path, version, generation, blob, created_at,"
                " deleted_at, destroyed) VALUES (?, ?, ?, ?, ?, ?, NULL, 0)"
                " ON CONFLICT (kind, path, version) DO UPDATE SET"
                " generation = excluded.generation, blob = excluded.blob,"
                " deleted_at = NULL, destroyed = 0",
                (KIND_POLICY, name, POLICY_VERSION, generation, bytes(blob), now),
            )

    def get_policy(self, name: str) -> RecordRow:
        """See :meth:`nexus.store.base.Store.get_policy`."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT kind, path, version, generation, blob, created_at, deleted_at, destroyed"
                " FROM records WHERE kind = ? AND path = ? AND version = ?",
                (KIND_POLICY, name, POLICY_VERSION),
            ).fetchone()
        if row is None:
            raise NotFound(f"policy {name!r} not found")
        return _record(row)

    def list_policies(self) -> list[RecordRow]:
        """See :meth:`nexus.store.base.Store.list_policies`."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT kind, path, version, generation, blob, created_at, deleted_at, destroyed"
                " FROM records WHERE kind = ? ORDER BY path",
                (KIND_POLICY,),
            ).fetchall()
        return [_record(r) for r in rows]

    def delete_policy(self, name: str) -> bool:
        """See :meth:`nexus.store.base.Store.delete_policy`."""
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM records WHERE kind = ? AND path = ? AND version = ?",
                (KIND_POLICY, name, POLICY_VERSION),
            )
            return cur.rowcount > 0

    # ------------------------------------------------------------------ rotation

    def count_by_generation(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.count_by_generation`."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT generation, count(*) FROM records WHERE blob IS NOT NULL"
                " GROUP BY generation"
            ).fetchall()
        return {int(g): int(n) for g, n in rows}

    def _scan(self, sql_first: str, sql_next: str, generation: int,
              after: RecordKey | None, limit: int) -> list[ScanRow]:
        check_limit(limit)
        with self._read() as conn:
            if after is None:
                rows = conn.execute(sql_first, (generation, limit)).fetchall()
            else:
                rows = conn.execute(
                    sql_next, (generation, after.kind, after.path, after.version, limit)
                ).fetchall()
        # Hot in rotation (every row, twice): the columns come in ScanRow order, so each
        # row is built in C (sqlite3 returns BLOBs as bytes).
        return list(map(ScanRow._make, rows))

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
        with self._write() as conn:
            # Numbered parameters in BlobUpdate's field order: the updates bind as they
            # are, with no per-row tuple built (this runs for every row of a rotation).
            cur = conn.executemany(
                "UPDATE records SET generation = ?6, blob = ?7 WHERE kind = ?1 AND path = ?2"
                " AND version = ?3 AND generation = ?4 AND blob = ?5",
                updates,
            )
            changed = max(cur.rowcount, 0)
            if state is not None:
                conn.execute(
                    "INSERT INTO state (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    state,
                )
            return changed

    # ------------------------------------------------------------------ integrity

    def count_by_header_generation(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.count_by_header_generation`."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT substr(blob, 1, 5), length(blob) >= ?, count(*) FROM records"
                " WHERE blob IS NOT NULL GROUP BY 1, 2",
                (ENVELOPE_MIN_BYTES,),
            ).fetchall()
        counts: dict[int, int] = {}
        for head, long_enough, n in rows:
            generation = header_generation(head, bool(long_enough))
            counts[generation] = counts.get(generation, 0) + int(n)
        return counts

    def generation_mismatches(self, after: RecordKey | None,
                              limit: int) -> list[GenerationMismatch]:
        """See :meth:`nexus.store.base.Store.generation_mismatches`."""
        check_limit(limit)
        with self._read() as conn:
            if after is None:
                rows = conn.execute(_MISMATCH_FIRST, (limit,)).fetchall()
            else:
                rows = conn.execute(
                    _MISMATCH_NEXT, (after.kind, after.path, after.version, limit)).fetchall()
        return [GenerationMismatch(r[0], r[1], r[2], int(r[3]),
                                   header_generation(r[4], bool(r[5]))) for r in rows]

    def fix_generation_cells(self, mismatches: Sequence[GenerationMismatch]) -> int:
        """See :meth:`nexus.store.base.Store.fix_generation_cells`."""
        fixes = [(m.header, m.kind, m.path, m.version, m.cell, f"{m.header:08X}")
                 for m in mismatches if m.header > 0]
        if not fixes:
            return 0
        with self._write() as conn:
            cur = conn.executemany(
                "UPDATE records SET generation = ? WHERE kind = ? AND path = ? AND version = ?"
                " AND generation = ? AND blob IS NOT NULL AND length(blob) >= 33"
                " AND substr(blob, 1, 1) = x'01' AND hex(substr(blob, 2, 4)) = ?",
                fixes,
            )
            return max(cur.rowcount, 0)

    # ------------------------------------------------------------------ state

    def get_state(self, key: str) -> str | None:
        """See :meth:`nexus.store.base.Store.get_state`."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put_state(self, key: str, value: str) -> None:
        """See :meth:`nexus.store.base.Store.put_state`."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def swap_state(self, key: str, expected: str | None, value: str) -> bool:
        """See :meth:`nexus.store.base.Store.swap_state`."""
        with self._write() as conn:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            current = None if row is None else str(row[0])
            if current != expected:
                return False
            conn.execute(
                "INSERT INTO state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
            return True

    def delete_state(self, key: str) -> None:
        """See :meth:`nexus.store.base.Store.delete_state`."""
        with self._write() as conn:
            conn.execute("DELETE FROM state WHERE key = ?", (key,))

    # ------------------------------------------------------------------ counters

    def add_encryptions(self, generation: int, n: int) -> None:
        """See :meth:`nexus.store.base.Store.add_encryptions`."""
        if n == 0:
            return
        with self._write() as conn:
            conn.execute(
                "INSERT INTO encryption_counts (generation, count) VALUES (?, ?)"
                " ON CONFLICT (generation) DO UPDATE SET count = count + excluded.count",
                (generation, n),
            )

    def encryption_counts(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.encryption_counts`."""
        with self._read() as conn:
            rows = conn.execute("SELECT generation, count FROM encryption_counts").fetchall()
        return {int(g): int(n) for g, n in rows}

    # ------------------------------------------------------------------ housekeeping

    def is_empty(self) -> bool:
        """See :meth:`nexus.store.base.Store.is_empty`."""
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM records LIMIT 1").fetchone() is None

    def check_writable(self) -> None:
        """See :meth:`nexus.store.base.Store.check_writable`."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO write_probe (id, at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                (time.time(),),
            )
