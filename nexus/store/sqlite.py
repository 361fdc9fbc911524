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
- Group commit for puts (:class:`_PutQueue`): concurrent :meth:`SqliteStore.put_secret` calls
  coalesce into one transaction and therefore one fsync of the WAL; each call still returns only
  after the commit that holds its own version is durable. Off (``group_commit=False``): every
  put is its own transaction, as every other write is. Every other write (deletes, policies,
  rotation batches, state rows, the import's ``put_secrets`` batches) takes the same writer
  lock as a group commit, so they stay serialised with the put batches. PostgreSQL needs no
  such queue: there each connection commits on its own and the server already makes
  concurrent commits share a WAL flush (``commit_delay`` tunes it), so
  :mod:`nexus.store.postgres` is unchanged.
- The database file (and therefore its ``-wal``/``-shm`` companions, which SQLite creates with
  the main file's permissions) is mode 0600.

The statements and the operations themselves are shared with PostgreSQL (:mod:`nexus.store.sql`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from nexus.store import base
from nexus.store import sql as shared
from nexus.store.base import BlobUpdate, SecretRow, StoreError, StoreUnavailable

T = TypeVar("T")

DIALECT = shared.SQLITE
DRIVER_ERRORS = shared.DriverErrors(
    "sqlite", unavailable=(sqlite3.OperationalError,), integrity=(sqlite3.IntegrityError,),
    every=(sqlite3.Error,))
STATEMENTS = shared.Statements.of(DIALECT)
MIGRATIONS = shared.migrations(DIALECT)
SCHEMA_VERSION = shared.SCHEMA_VERSION

# Numbered parameters in BlobUpdate's field order: the updates bind as they are, with no
# per-row tuple built (this runs for every row of a rotation).
# A batch of puts to paths that do not exist yet (an import) is written in bulk.
_BULK_MIN = 8
_BULK_CHUNK = 500
_EXISTING_META = "SELECT path FROM secret_meta WHERE path IN (SELECT value FROM json_each(?))"
_EXISTING_RECORDS = ("SELECT DISTINCT path FROM records WHERE kind = ?"
                     " AND path IN (SELECT value FROM json_each(?))")
_REPLACE_BLOB = ("UPDATE records SET generation = ?6, blob = ?7 WHERE kind = ?1 AND path = ?2"
                 " AND version = ?3 AND generation = ?4 AND blob = ?5")
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


class _Pending:
    """One put waiting for its group commit: its request, then its outcome.

    ``_wake`` is a lock held from the start; releasing it wakes the caller, either because
    its outcome is settled or because it has been handed the lead.
    """

    __slots__ = ("_wake", "done", "outcome", "request")

    def __init__(self, request: base.PutRequest) -> None:
        self.request = request
        self.outcome: int | BaseException = 0
        self.done = False
        self._wake = threading.Lock()
        self._wake.acquire()

    def settle(self, outcome: int | BaseException) -> None:
        self.outcome = outcome
        self.done = True

    def wake(self) -> None:
        self._wake.release()

    def sleep(self) -> None:
        self._wake.acquire()

    def result(self) -> int:
        outcome = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class _PutQueue:
    """Leader/follower group commit of puts.

    A put joins the queue. If no commit is being led, its caller becomes the leader at once
    (a lone writer waits for nobody); otherwise it sleeps. The leader takes every put queued
    so far, has ``commit`` apply them in one transaction (settling each one's outcome),
    then hands the lead to the first put that queued meanwhile and wakes each put of its
    batch, which returns its own version or raises its own exception. So while one batch
    is being made durable, the next one gathers; nothing waits on a timer.

    A leader interrupted by a ``BaseException`` (not a store error: those are outcomes)
    puts the followers it had not settled back at the head of the queue for the next
    leader; its own put is dropped (its transaction was rolled back).
    """

    def __init__(self, commit: Callable[[list[_Pending]], None]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._waiting: list[_Pending] = []
        self._leading = False

    def put(self, request: base.PutRequest) -> int:
        own = _Pending(request)
        with self._lock:
            self._waiting.append(own)
            follow = self._leading
            self._leading = True
        if follow:
            own.sleep()
            if own.done:
                return own.result()
        self._lead(own)
        return own.result()

    def waiting(self) -> int:
        """Puts queued behind the commit in flight (for tests)."""
        with self._lock:
            return len(self._waiting)

    def _lead(self, own: _Pending) -> None:
        with self._lock:
            batch, self._waiting = self._waiting, []
        try:
            self._commit(batch)
        finally:
            again = [p for p in batch if not p.done and p is not own]
            with self._lock:
                self._waiting[:0] = again
                successor = self._waiting[0] if self._waiting else None
                self._leading = successor is not None
            for pending in batch:
                if pending.done and pending is not own:
                    pending.wake()
            if successor is not None:
                successor.wake()


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


class SqliteStore(shared.SqlStore):
    """The SQLite implementation of :class:`nexus.store.base.Store` (thread-safe)."""

    dialect = DIALECT
    sql = STATEMENTS

    def __init__(self, path: str, writer: sqlite3.Connection, lock_fd: int = -1, *,
                 group_commit: bool = True) -> None:
        """Use :meth:`open`; this constructor takes an open writer connection (and the
        descriptor holding the database's lock file, closed by :meth:`close`)."""
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
        self._puts = _PutQueue(self._commit_puts) if group_commit else None
        # Tests: called with the number of puts inside each put transaction, before its
        # COMMIT (holding it there lets followers queue, whatever the machine's speed).
        self.put_commit_hook: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, group_commit: bool = True) -> SqliteStore:
        """Open (creating if needed) the database at ``path`` and apply pending migrations.

        ``group_commit=False`` commits every put on its own (see :class:`_PutQueue`).
        Raises :class:`SchemaTooNew` if the file was written by a newer release.
        """
        spath = os.fspath(path)
        if spath == ":memory:" or spath.startswith("file:"):
            raise ValueError("SqliteStore needs a file path (no :memory: or URI)")
        lock_fd = _lock_database(spath)
        try:
            return cls._open_locked(spath, lock_fd, group_commit)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, spath: str, lock_fd: int, group_commit: bool) -> SqliteStore:
        with shared.translated(DRIVER_ERRORS):
            _secure_file(spath)
            writer = cls._connect(spath)
            try:
                mode = writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"sqlite: cannot switch {spath} to WAL (got {mode})")
                store = cls(spath, writer, lock_fd, group_commit=group_commit)
                store._write(lambda conn: shared.migrate(conn, STATEMENTS, MIGRATIONS))
            except BaseException:
                writer.close()
                raise
        _secure_file(spath, create=False)
        return store

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

    # ------------------------------------------------------------------ primitives

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("store is closed")

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One ``BEGIN IMMEDIATE`` transaction on the writer connection."""
        with self._write_lock, shared.translated(DRIVER_ERRORS):
            self._check_open()
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return result
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

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A single statement on this thread's reader: one statement is its own consistent
        snapshot in SQLite, so no BEGIN/COMMIT round trip (hot: every get)."""
        with shared.translated(DRIVER_ERRORS):
            self._check_open()
            return fn(self._reader())

    def _snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read transaction (one consistent snapshot) on this thread's reader."""

        def in_transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

        return self._read(in_transaction)

    def _replace_rows(self, conn: shared.Connection, updates: Sequence[BlobUpdate]) -> int:
        return shared.executemany(conn, _REPLACE_BLOB, updates)

    def _fresh_paths(self, conn: shared.Connection,
                     requests: Sequence[base.PutRequest]) -> frozenset[str]:
        """One writer holds the file (and its lock for the whole transaction), so a path
        with no metadata row and no record cannot gain one before this batch commits: it is
        written in bulk. Two queries per batch instead of four statements per put."""
        if len(requests) < _BULK_MIN:
            return frozenset()
        counts: dict[str, int] = {}
        for request in requests:
            # A check-and-set above 0 on a new path is refused: _put_in says so.
            bump = 1 if request.cas in (None, 0) else 2
            counts[request.path] = counts.get(request.path, 0) + bump
        once = [p for p, n in counts.items() if n == 1]
        taken: set[str] = set()
        for start in range(0, len(once), _BULK_CHUNK):
            chunk = json.dumps(once[start:start + _BULK_CHUNK])
            taken.update(row[0] for row in conn.execute(_EXISTING_META, (chunk,)).fetchall())
            taken.update(row[0] for row in conn.execute(_EXISTING_RECORDS,
                                                        (base.KIND_SECRET, chunk)).fetchall())
        return frozenset(once) - taken

    # ------------------------------------------------------------------ cached reads

    def get_secret(self, path: str, version: int | None = None) -> SecretRow:
        """See :meth:`nexus.store.base.Store.get_secret` (served from :class:`RowCache`
        when nothing was written since the row was read)."""
        key = (path, version)
        epoch = self._epoch  # before the SELECT (see RowCache)
        cached = self._rows.get(key, epoch)
        if cached is not None:
            self._check_open()
            return cached
        found = super().get_secret(path, version)
        self._rows.put(key, epoch, found)
        return found

    # ------------------------------------------------------------------ group commit

    def put_secret(self, path: str, *, cas: int | None, max_versions: int, now: float,
                   seal: base.Seal) -> int:
        """See :meth:`nexus.store.base.Store.put_secret`; with group commit, concurrent calls
        share one transaction and one fsync (:class:`_PutQueue`, :meth:`_commit_puts`)."""
        if self._puts is None:
            return self._commit_one(base.PutRequest(path, cas, max_versions, now, seal))
        request = base.PutRequest(path, cas, max_versions, now, seal)
        base.check_put(request)
        self._check_open()
        return self._puts.put(request)

    def _commit_one(self, request: base.PutRequest) -> int:
        """One put in its own transaction (group commit off, a batch of one, a retry)."""
        base.check_put(request)

        def tx(conn: sqlite3.Connection) -> int:
            version = self._put_in(conn, request)
            if self.put_commit_hook is not None:
                self.put_commit_hook(1)
            return version

        return self._write(tx)

    def _commit_puts(self, batch: list[_Pending]) -> None:
        """Apply a batch of puts, settling each one's outcome (called by the leader).

        Each put is all-or-nothing in its own savepoint, and *any* exception it raises
        (its ``seal`` callback's, a refusal, a constraint) rolls back that savepoint only and
        becomes its own outcome, so no put fails because of another's. The only errors left
        are those of the transaction as a whole (it could not begin, a savepoint could not
        be rolled back because the database aborted the transaction, the COMMIT failed):
        then nothing of the batch was written, and each put runs again alone, in order, in
        its own transaction, getting exactly the outcome it would have had without group
        commit. A retried put seals again, so its caller counts both encryptions: correct,
        since the key's usage counter counts encryptions made, not versions stored.
        """
        if len(batch) == 1:
            self._settle_alone(batch[0])
            return
        requests = [p.request for p in batch]
        try:
            outcomes = self._write(lambda conn: self._put_group(conn, requests))
        except Exception:  # the batch as a whole failed: each put alone
            for pending in batch:
                self._settle_alone(pending)
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.settle(outcome)

    def _settle_alone(self, pending: _Pending) -> None:
        try:
            pending.settle(self._commit_one(pending.request))
        except Exception as exc:  # the caller's own outcome, raised in its thread
            pending.settle(exc)

    def _put_group(self, conn: sqlite3.Connection,
                   requests: Sequence[base.PutRequest]) -> list[int | BaseException]:
        outcomes: list[int | BaseException] = []
        for request in requests:
            conn.execute("SAVEPOINT put_one")
            try:
                outcomes.append(self._put_in(conn, request))
            except Exception as exc:  # this put's own outcome
                conn.execute("ROLLBACK TO SAVEPOINT put_one")  # raises: the batch failed
                outcomes.append(_own_error(exc))
            conn.execute("RELEASE SAVEPOINT put_one")
        if self.put_commit_hook is not None:
            self.put_commit_hook(len(requests))
        return outcomes

    def pending_puts(self) -> int:
        """Puts queued for the next group commit (0 with group commit off); for tests."""
        return 0 if self._puts is None else self._puts.waiting()


def _own_error(exc: Exception) -> BaseException:
    """A put's exception as its caller would have seen it alone: driver errors translated."""
    if isinstance(exc, DRIVER_ERRORS.every):
        error = shared.store_error(exc, DRIVER_ERRORS)
        error.__cause__ = exc
        return error
    return exc
