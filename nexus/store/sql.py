"""The SQL both store backends share, written once over a small :class:`Dialect`.

Here are the schema, every statement, the row mappers, the migration runner and every
:class:`nexus.store.base.Store` operation. A backend (``sqlite.py``, ``postgres.py``) is a
:class:`SqlStore` that adds only what is its own: how it connects, how it runs a read and a
transaction (and what it locks meanwhile), and the one statement whose shape differs, the
batched blob replacement of a rotation.

Statements are written with ``?`` placeholders and ``{word}`` fields; :meth:`Dialect.render`
fills the fields in and turns the placeholders into the driver's. Driver exceptions never
leave a store: :func:`store_error` maps them to the errors of :mod:`nexus.store.base`.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Protocol, TypeVar

from nexus.store import base

T = TypeVar("T")

RECORD_COLUMNS = "kind, path, version, generation, blob, created_at, deleted_at, destroyed"
"""The columns of a ``records`` row, in the order the row mappers read them."""


# --------------------------------------------------------------------------- driver surface


class Cursor(Protocol):
    """What the shared code uses of a DB-API cursor (sqlite3 and psycopg alike)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Sequence[Any]: ...

    def executemany(self, query: str, params_seq: Iterable[Sequence[Any]], /) -> object: ...


class Connection(Protocol):
    """What the shared code uses of a connection: one statement at a time."""

    def execute(self, query: str, params: Sequence[Any] = ..., /) -> Cursor: ...

    def cursor(self) -> Cursor: ...


def executemany(conn: Connection, statement: str, rows: Iterable[Sequence[Any]]) -> int:
    """Run ``statement`` once per parameter row; return the rows changed in all."""
    cur = conn.cursor()
    cur.executemany(statement, rows)
    return max(cur.rowcount, 0)


# --------------------------------------------------------------------------- dialect


# The SQL words that differ, side by side. ``header_is`` is the condition "the blob's envelope
# header names generation {g}" (format byte 1, then the generation big-endian; see
# nexus.crypto.envelope) for a blob known to be long enough.
_WORDS: dict[str, tuple[str, str]] = {
    #                SQLite                                PostgreSQL
    "true":          ("1",                                 "TRUE"),
    "false":         ("0",                                 "FALSE"),
    "key_text":      ("TEXT",                              'TEXT COLLATE "C"'),
    "real":          ("REAL",                              "DOUBLE PRECISION"),
    "blob":          ("BLOB",                              "BYTEA"),
    "counter":       ("INTEGER",                           "BIGINT"),
    "flag":          ("INTEGER NOT NULL DEFAULT 0 CHECK (destroyed IN (0, 1))",
                      "BOOLEAN NOT NULL DEFAULT FALSE"),
    "table_options": (" WITHOUT ROWID",                    " WITH (fillfactor = 85)"),
    # SQLite: BEGIN IMMEDIATE, the writer holds the whole database already.
    "for_update":    ("",                                  " FOR UPDATE"),
    "header_is":     ("substr(blob, 1, 1) = x'01'"
                      " AND hex(substr(blob, 2, 4)) = printf('%08X', {g})",
                      "substr(blob, 1, 1) = '\\x01'::bytea"
                      " AND substr(blob, 2, 4) = int4send(({g})::integer)"),
}


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the SQL of two databases, as data.

    ``words`` fill the ``{word}`` fields of a template (see ``_WORDS``);
    ``generation_limit`` bounds the generations the ``generation`` column can hold.
    """

    name: str
    placeholder: str
    words: Mapping[str, str]
    generation_limit: int

    @classmethod
    def of(cls, name: str, column: int, placeholder: str, generation_limit: int) -> Dialect:
        """The dialect of column ``column`` of ``_WORDS``."""
        words = {word: pair[column] for word, pair in _WORDS.items()}
        words["min_bytes"] = str(base.ENVELOPE_MIN_BYTES)
        words["record_columns"] = RECORD_COLUMNS
        words["header_is_column"] = words["header_is"].format(g="generation")
        words["header_is_param"] = words["header_is"].format(g="?")
        return cls(name, placeholder, words, generation_limit)

    def render(self, template: str) -> str:
        """``template`` in this dialect: fields filled in, placeholders the driver's."""
        return template.format_map(self.words).replace("?", self.placeholder)


SQLITE = Dialect.of("sqlite", 0, "?", 2**32)
POSTGRES = Dialect.of("postgres", 1, "%s", 2**31)  # generation: a signed 32-bit column


class DriverErrors(NamedTuple):
    """How a driver's exceptions sort: the database is unusable now, a write broke a
    constraint, and the root of every exception the driver raises."""

    name: str
    unavailable: tuple[type[Exception], ...]
    integrity: tuple[type[Exception], ...]
    every: tuple[type[Exception], ...]


def store_error(exc: Exception, driver: DriverErrors) -> base.StoreError:
    """The store error for a driver exception (the caller raises it ``from exc``)."""
    if isinstance(exc, driver.unavailable):
        return base.StoreUnavailable(f"{driver.name}: {exc}")
    if isinstance(exc, driver.integrity):
        # The first line only: the detail lines of some drivers quote the row's values.
        first_line = str(exc).partition("\n")[0]
        return base.ConstraintViolation(f"{driver.name}: {first_line}")
    return base.StoreError(f"{driver.name}: {exc}")


@contextlib.contextmanager
def translated(driver: DriverErrors) -> Iterator[None]:
    """Let no driver exception out: each becomes the matching store error."""
    try:
        yield
    except driver.every as exc:
        raise store_error(exc, driver) from exc


# --------------------------------------------------------------------------- schema

_SCHEMA_1 = (
    """
    CREATE TABLE records (
        kind        {key_text} NOT NULL,
        path        {key_text} NOT NULL,
        version     INTEGER NOT NULL,
        generation  INTEGER NOT NULL,
        blob        {blob},
        created_at  {real} NOT NULL,
        deleted_at  {real},
        destroyed   {flag},
        CHECK ((blob IS NULL) = (destroyed = {true})),
        PRIMARY KEY (kind, path, version)
    ){table_options}
    """,
    """
    CREATE TABLE secret_meta (
        path            {key_text} NOT NULL PRIMARY KEY,
        current_version INTEGER NOT NULL,
        oldest_version  INTEGER NOT NULL,
        created_at      {real} NOT NULL,
        updated_at      {real} NOT NULL
    )
    """,
    """
    CREATE TABLE state (
        key   {key_text} NOT NULL PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE encryption_counts (
        generation INTEGER NOT NULL PRIMARY KEY,
        count      {counter} NOT NULL
    )
    """,
    """
    CREATE TABLE write_probe (
        id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
        at {real} NOT NULL
    )
    """,
)

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _SCHEMA_1,  # 1: initial schema
)

SCHEMA_VERSION = len(_MIGRATIONS)
"""The newest schema version this code knows (the same on every backend)."""


def migrations(dialect: Dialect) -> tuple[tuple[str, ...], ...]:
    """Ordered schema steps in ``dialect``; step ``i`` brings version ``i`` to ``i + 1``."""
    return tuple(tuple(dialect.render(s) for s in step) for step in _MIGRATIONS)


def migrate(conn: Connection, statements: Statements,
            steps: Sequence[Sequence[str]]) -> None:
    """Apply the pending ``steps`` (inside the caller's transaction and lock).

    Raises :class:`nexus.store.base.SchemaTooNew` when the database is newer than ``steps``.
    """
    conn.execute(statements.create_schema_version)
    row = conn.execute(statements.schema_version).fetchone()
    found, known = (0 if row is None else int(row[0])), len(steps)
    if found > known:
        raise base.SchemaTooNew(found, known)
    for step in steps[found:]:
        for statement in step:
            conn.execute(statement)
    if found != known:
        conn.execute(statements.set_schema_version, (known,))


# --------------------------------------------------------------------------- statements

_SCAN_OTHER = ("SELECT kind, path, version, generation, blob FROM records"
               " WHERE blob IS NOT NULL AND generation <> ?")
_SCAN_SAME = ("SELECT kind, path, version, generation, blob FROM records"
              " WHERE blob IS NOT NULL AND generation = ?")
# A blob whose envelope header does not name the generation in its column.
_MISMATCH = ("SELECT kind, path, version, generation, substr(blob, 1, 5),"
             " length(blob) >= {min_bytes} FROM records WHERE blob IS NOT NULL"
             " AND NOT (length(blob) >= {min_bytes} AND {header_is_column})")
_AFTER = " AND (kind, path, version) > (?, ?, ?)"
_PAGE = " ORDER BY kind, path, version LIMIT ?"
_UPSERT_STATE = ("INSERT INTO state (key, value) VALUES (?, ?)"
                 " ON CONFLICT (key) DO UPDATE SET value = excluded.value")


@dataclass(frozen=True, slots=True)
class Statements:
    """Every shared statement; the defaults are the templates, :meth:`of` renders them."""

    create_schema_version: str = (
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)")
    schema_version: str = "SELECT version FROM schema_version WHERE id = 1"
    set_schema_version: str = (
        "INSERT INTO schema_version (id, version) VALUES (1, ?)"
        " ON CONFLICT (id) DO UPDATE SET version = excluded.version")
    # -- secrets
    lock_meta: str = ("SELECT current_version, oldest_version FROM secret_meta"
                      " WHERE path = ?{for_update}")
    new_meta: str = ("INSERT INTO secret_meta (path, current_version, oldest_version,"
                     " created_at, updated_at) VALUES (?, 0, 1, ?, ?)"
                     " ON CONFLICT (path) DO NOTHING")
    new_meta_written: str = ("INSERT INTO secret_meta (path, current_version, oldest_version,"
                             " created_at, updated_at) VALUES (?, 1, 1, ?, ?)")
    newest_version: str = "SELECT max(version) FROM records WHERE kind = ? AND path = ?"
    insert_version: str = ("INSERT INTO records ({record_columns})"
                           " VALUES (?, ?, ?, ?, ?, ?, NULL, {false})")
    update_meta: str = ("UPDATE secret_meta SET current_version = ?, oldest_version = ?,"
                        " updated_at = ? WHERE path = ?")
    prune: str = "DELETE FROM records WHERE kind = ? AND path = ? AND version < ?"
    current_record: str = (
        "SELECT r.kind, r.path, r.version, r.generation, r.blob, r.created_at,"
        " r.deleted_at, r.destroyed FROM secret_meta m JOIN records r"
        " ON r.kind = ? AND r.path = m.path AND r.version = m.current_version"
        " WHERE m.path = ?")
    one_record: str = ("SELECT {record_columns} FROM records"
                       " WHERE kind = ? AND path = ? AND version = ?")
    meta: str = ("SELECT current_version, oldest_version, created_at, updated_at"
                 " FROM secret_meta WHERE path = ?")
    version_infos: str = ("SELECT version, created_at, deleted_at, destroyed FROM records"
                          " WHERE kind = ? AND path = ? ORDER BY version")
    # Paths order by their UTF-8 bytes: BINARY collation on SQLite, "C" on PostgreSQL.
    list_paths: str = ("SELECT path FROM secret_meta WHERE current_version > 0"
                       " AND path >= ? AND substr(path, 1, ?) = ?")
    paths_below: str = " AND path < ?"
    paths_after: str = " AND path > ?"
    paths_page: str = " ORDER BY path"
    limit: str = " LIMIT ?"
    current_version: str = "SELECT current_version FROM secret_meta WHERE path = ?"
    delete_version: str = ("UPDATE records SET deleted_at = ? WHERE kind = ? AND path = ?"
                           " AND version = ? AND deleted_at IS NULL")
    undelete_version: str = ("UPDATE records SET deleted_at = NULL WHERE kind = ?"
                             " AND path = ? AND version = ? AND deleted_at IS NOT NULL"
                             " AND destroyed = {false}")
    destroy_version: str = ("UPDATE records SET blob = NULL, destroyed = {true}"
                            " WHERE kind = ? AND path = ? AND version = ?"
                            " AND destroyed = {false}")
    # -- policies
    put_policy: str = ("INSERT INTO records ({record_columns})"
                       " VALUES (?, ?, ?, ?, ?, ?, NULL, {false})"
                       " ON CONFLICT (kind, path, version) DO UPDATE SET"
                       " generation = excluded.generation, blob = excluded.blob,"
                       " deleted_at = NULL, destroyed = {false}")
    policies: str = "SELECT {record_columns} FROM records WHERE kind = ? ORDER BY path"
    delete_record: str = "DELETE FROM records WHERE kind = ? AND path = ? AND version = ?"
    # -- rotation and integrity
    count_by_generation: str = ("SELECT generation, count(*) FROM records"
                                " WHERE blob IS NOT NULL GROUP BY generation")
    scan_other_first: str = _SCAN_OTHER + _PAGE
    scan_other_next: str = _SCAN_OTHER + _AFTER + _PAGE
    scan_same_first: str = _SCAN_SAME + _PAGE
    scan_same_next: str = _SCAN_SAME + _AFTER + _PAGE
    header_counts: str = ("SELECT substr(blob, 1, 5), length(blob) >= {min_bytes}, count(*)"
                          " FROM records WHERE blob IS NOT NULL GROUP BY 1, 2")
    mismatches_first: str = _MISMATCH + _PAGE
    mismatches_next: str = _MISMATCH + _AFTER + _PAGE
    fix_cell: str = ("UPDATE records SET generation = ? WHERE kind = ? AND path = ?"
                     " AND version = ? AND generation = ? AND blob IS NOT NULL"
                     " AND length(blob) >= {min_bytes} AND {header_is_param}")
    # -- state, counters, housekeeping
    get_state: str = "SELECT value FROM state WHERE key = ?"
    # substr, not a range: the state table is small, and no collation can reorder a prefix.
    states_with_prefix: str = ("SELECT key, value FROM state WHERE substr(key, 1, ?) = ?"
                               " ORDER BY key")
    put_state: str = _UPSERT_STATE
    create_state: str = "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
    swap_state: str = "UPDATE state SET value = ? WHERE key = ? AND value = ?"
    delete_state: str = "DELETE FROM state WHERE key = ?"
    add_encryptions: str = (
        "INSERT INTO encryption_counts (generation, count) VALUES (?, ?)"
        " ON CONFLICT (generation) DO UPDATE SET"
        " count = encryption_counts.count + excluded.count")
    encryption_counts: str = "SELECT generation, count FROM encryption_counts"
    any_record: str = "SELECT 1 FROM records LIMIT 1"
    probe: str = ("INSERT INTO write_probe (id, at) VALUES (1, ?)"
                  " ON CONFLICT (id) DO UPDATE SET at = excluded.at")

    @classmethod
    def of(cls, dialect: Dialect) -> Statements:
        """Every statement rendered in ``dialect``."""
        return cls(**{f.name: dialect.render(str(f.default)) for f in fields(cls)})


# --------------------------------------------------------------------------- rows


def record_row(row: Sequence[Any]) -> base.RecordRow:
    """A ``records`` row (:data:`RECORD_COLUMNS`) as a :class:`RecordRow`."""
    return base.RecordRow(
        kind=row[0], path=row[1], version=row[2], generation=row[3],
        blob=None if row[4] is None else bytes(row[4]),
        created_at=row[5], deleted_at=row[6], destroyed=bool(row[7]),
    )


def secret_row(row: Sequence[Any]) -> base.SecretRow:
    """A ``records`` row of a secret (:data:`RECORD_COLUMNS`) as a :class:`SecretRow`."""
    return base.SecretRow(
        path=row[1], version=row[2], generation=row[3],
        blob=None if row[4] is None else bytes(row[4]),
        created_at=row[5], deleted_at=row[6], destroyed=bool(row[7]),
    )


def prefix_upper_bound(prefix: str) -> str | None:
    """Smallest string greater than every string starting with ``prefix`` (None: unbounded)."""
    if not prefix:
        return None
    last = ord(prefix[-1])
    if last >= 0x10FFFF or 0xD7FF <= last <= 0xDFFF:
        return None
    return prefix[:-1] + chr(last + 1)


# --------------------------------------------------------------------------- the store


class SqlStore(ABC):
    """Every :class:`nexus.store.base.Store` operation over the shared statements.

    A subclass sets :attr:`dialect` and :attr:`sql` and implements the four primitives:
    :meth:`_read` (one statement), :meth:`_snapshot` (several reads that must agree),
    :meth:`_write` (one atomic transaction; an exception rolls it back and propagates)
    and :meth:`_replace_rows`; plus :meth:`close`. Each primitive maps driver errors to
    store errors (:func:`translated`).
    """

    dialect: Dialect
    sql: Statements
    notify_state: str | None = None
    """A statement announcing a changed state key to other nodes (PostgreSQL), or None."""

    # ------------------------------------------------------------------ primitives

    @abstractmethod
    def _read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` (a single statement) on a reading connection."""

    @abstractmethod
    def _snapshot(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` (several reads) so that it sees one consistent state."""

    @abstractmethod
    def _write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction and commit it."""

    @abstractmethod
    def _replace_rows(self, conn: Connection, updates: Sequence[base.BlobUpdate]) -> int:
        """Apply the conditional blob replacements (inside :meth:`_write`); rows changed."""

    @abstractmethod
    def close(self) -> None:
        """See :meth:`nexus.store.base.Store.close`."""

    def _fetchone(self, statement: str, params: Sequence[Any] = ()) -> Any:
        return self._read(lambda conn: conn.execute(statement, params).fetchone())

    def _fetchall(self, statement: str, params: Sequence[Any] = ()) -> Sequence[Any]:
        return self._read(lambda conn: conn.execute(statement, params).fetchall())

    def _execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """One statement in its own write transaction; return the rows it changed."""
        return self._write(lambda conn: max(conn.execute(statement, params).rowcount, 0))

    def _page(self, first: str, following: str, params: Sequence[Any],
              after: base.RecordKey | None, limit: int) -> Sequence[Any]:
        """A keyset page: rows after ``after`` (None: from the start), at most ``limit``."""
        base.check_limit(limit)
        if after is None:
            return self._fetchall(first, (*params, limit))
        return self._fetchall(following, (*params, after.kind, after.path, after.version,
                                          limit))

    # ------------------------------------------------------------------ secrets

    def put_secret(self, path: str, *, cas: int | None, max_versions: int, now: float,
                   seal: base.Seal) -> int:
        """See :meth:`nexus.store.base.Store.put_secret`."""
        request = base.PutRequest(path, cas, max_versions, now, seal)
        base.check_put(request)
        return self._write(lambda conn: self._put_in(conn, request))

    def put_secrets(self, requests: Sequence[base.PutRequest]) -> list[base.PutOutcome]:
        """See :meth:`nexus.store.base.Store.put_secrets`."""
        for request in requests:
            base.check_put(request)
        if not requests:
            return []

        def tx(conn: Connection) -> list[base.PutOutcome]:
            fresh = self._fresh_paths(conn, requests)
            outcomes: list[base.PutOutcome] = []
            if fresh:
                self._put_fresh(conn, [r for r in requests if r.path in fresh])
            for request in requests:
                if request.path in fresh:
                    outcomes.append(1)
                    continue
                conn.execute("SAVEPOINT put_one")
                try:
                    outcomes.append(self._put_in(conn, request))
                except (base.CasMismatch, base.InconsistentMetadata) as exc:
                    conn.execute("ROLLBACK TO SAVEPOINT put_one")
                    outcomes.append(exc)
                conn.execute("RELEASE SAVEPOINT put_one")
            return outcomes

        return self._write(tx)

    def _fresh_paths(self, conn: Connection,
                     requests: Sequence[base.PutRequest]) -> frozenset[str]:
        """Paths of ``requests`` that can be written as version 1 in bulk: named once in the
        batch, with no metadata row and no record, on a store whose writer cannot race
        (SQLite overrides this; here: none, so every put takes :meth:`_put_in`)."""
        return frozenset()

    def _put_fresh(self, conn: Connection, requests: Sequence[base.PutRequest]) -> None:
        """Write version 1 of each new path (see :meth:`_fresh_paths`): the same rows
        :meth:`_put_in` writes for a new path, in two statements for the whole batch."""
        rows = []
        for request in requests:
            generation, blob = request.seal(1)
            rows.append((base.KIND_SECRET, request.path, 1, generation, bytes(blob),
                         request.now))
        executemany(conn, self.sql.new_meta_written,
                    [(r.path, r.now, r.now) for r in requests])
        executemany(conn, self.sql.insert_version, rows)

    def _put_in(self, conn: Connection, request: base.PutRequest) -> int:
        """One put inside the caller's transaction; raises before writing when refused."""
        sql, path = self.sql, request.path
        current, old_oldest = self._lock_meta(conn, path, request.now)
        newest = conn.execute(sql.newest_version, (base.KIND_SECRET, path)).fetchone()
        # Before anything is written or pruned: metadata that contradicts the
        # records would make this put fail, or prune versions it must keep.
        base.check_metadata(path, current, old_oldest,
                            None if newest is None or newest[0] is None else int(newest[0]))
        if request.cas is not None and request.cas != current:
            raise base.CasMismatch(request.cas, current)
        version = current + 1
        generation, blob = request.seal(version)
        conn.execute(sql.insert_version,
                     (base.KIND_SECRET, path, version, generation, bytes(blob), request.now))
        oldest = base.prune_bounds(version, old_oldest, request.max_versions)
        conn.execute(sql.update_meta, (version, oldest, request.now, path))
        if current > 0:
            conn.execute(sql.prune, (base.KIND_SECRET, path, oldest))
        return version

    def _lock_meta(self, conn: Connection, path: str, now: float) -> tuple[int, int]:
        """``(current, oldest)`` of ``path``, its metadata row locked until the commit.

        A path not written yet gets a placeholder row (current version 0) first, so that
        concurrent first writes queue on one row; it commits only with a version.
        """
        meta = conn.execute(self.sql.lock_meta, (path,)).fetchone()
        if meta is None:
            if conn.execute(self.sql.new_meta, (path, now, now)).rowcount == 1:
                return 0, 1
            meta = conn.execute(self.sql.lock_meta, (path,)).fetchone()
            if meta is None:  # pragma: no cover - the row was just inserted or existed
                raise base.StoreError(f"secret {path!r}: metadata row vanished")
        return int(meta[0]), int(meta[1])

    def get_secret(self, path: str, version: int | None = None) -> base.SecretRow:
        """See :meth:`nexus.store.base.Store.get_secret`."""
        if version is None:
            row = self._fetchone(self.sql.current_record, (base.KIND_SECRET, path))
        else:
            row = self._fetchone(self.sql.one_record, (base.KIND_SECRET, path, version))
        if row is None:
            what = "current version" if version is None else f"version {version}"
            raise base.NotFound(f"secret {path!r}: {what} not found")
        return secret_row(row)

    def secret_meta(self, path: str) -> base.SecretMeta:
        """See :meth:`nexus.store.base.Store.secret_meta`."""

        def tx(conn: Connection) -> tuple[Any, Sequence[Any]]:
            meta = conn.execute(self.sql.meta, (path,)).fetchone()
            if meta is None or meta[0] == 0:
                raise base.NotFound(f"secret {path!r} not found")
            return meta, conn.execute(self.sql.version_infos,
                                      (base.KIND_SECRET, path)).fetchall()

        meta, rows = self._snapshot(tx)
        # The row alone (its two reads are not one snapshot on every backend).
        base.check_metadata(path, int(meta[0]), int(meta[1]), None)
        return base.SecretMeta(
            path=path, current_version=meta[0], oldest_version=meta[1],
            created_at=meta[2], updated_at=meta[3],
            versions=tuple(base.VersionInfo(r[0], r[1], r[2], bool(r[3])) for r in rows),
        )

    def list_secret_paths(self, prefix: str = "", *, after: str | None = None,
                          limit: int | None = None) -> list[str]:
        """See :meth:`nexus.store.base.Store.list_secret_paths`."""
        if limit is not None:
            base.check_limit(limit)
        sql = self.sql
        statement, params = sql.list_paths, [prefix, len(prefix), prefix]
        upper = prefix_upper_bound(prefix)
        for clause, value in ((sql.paths_below, upper), (sql.paths_after, after)):
            if value is not None:
                statement += clause
                params.append(value)
        statement += sql.paths_page
        if limit is not None:
            statement += sql.limit
            params.append(limit)
        return [r[0] for r in self._fetchall(statement, params)]

    def _update_versions(self, path: str, versions: Sequence[int], statement: str,
                         extra: tuple[Any, ...]) -> int:
        def tx(conn: Connection) -> int:
            meta = conn.execute(self.sql.current_version, (path,)).fetchone()
            if meta is None or meta[0] == 0:
                raise base.NotFound(f"secret {path!r} not found")
            targets = sorted(set(versions)) if versions else [int(meta[0])]
            return executemany(conn, statement,
                               [(*extra, base.KIND_SECRET, path, v) for v in targets])

        return self._write(tx)

    def delete_versions(self, path: str, versions: Sequence[int], now: float) -> int:
        """See :meth:`nexus.store.base.Store.delete_versions`."""
        return self._update_versions(path, versions, self.sql.delete_version, (now,))

    def undelete_versions(self, path: str, versions: Sequence[int]) -> int:
        """See :meth:`nexus.store.base.Store.undelete_versions`."""
        base.check_nonempty_versions(versions, "undelete")
        return self._update_versions(path, versions, self.sql.undelete_version, ())

    def destroy_versions(self, path: str, versions: Sequence[int]) -> int:
        """See :meth:`nexus.store.base.Store.destroy_versions`."""
        base.check_nonempty_versions(versions, "destroy")
        return self._update_versions(path, versions, self.sql.destroy_version, ())

    # ------------------------------------------------------------------ policies

    def put_policy(self, name: str, generation: int, blob: bytes, now: float) -> None:
        """See :meth:`nexus.store.base.Store.put_policy`."""
        self._execute(self.sql.put_policy, (base.KIND_POLICY, name, base.POLICY_VERSION,
                                            generation, bytes(blob), now))

    def get_policy(self, name: str) -> base.RecordRow:
        """See :meth:`nexus.store.base.Store.get_policy`."""
        row = self._fetchone(self.sql.one_record,
                             (base.KIND_POLICY, name, base.POLICY_VERSION))
        if row is None:
            raise base.NotFound(f"policy {name!r} not found")
        return record_row(row)

    def list_policies(self) -> list[base.RecordRow]:
        """See :meth:`nexus.store.base.Store.list_policies`."""
        return [record_row(r) for r in self._fetchall(self.sql.policies, (base.KIND_POLICY,))]

    def delete_policy(self, name: str) -> bool:
        """See :meth:`nexus.store.base.Store.delete_policy`."""
        return self._execute(self.sql.delete_record,
                             (base.KIND_POLICY, name, base.POLICY_VERSION)) > 0

    # ------------------------------------------------------------------ rotation

    def count_by_generation(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.count_by_generation`."""
        return {int(g): int(n) for g, n in self._fetchall(self.sql.count_by_generation)}

    def scan_not_in_generation(self, target_generation: int, after: base.RecordKey | None,
                               limit: int) -> list[base.ScanRow]:
        """See :meth:`nexus.store.base.Store.scan_not_in_generation`."""
        # Hot in rotation (every row, twice): the columns come in ScanRow order and both
        # drivers return blobs as bytes, so each row is built in C.
        return list(map(base.ScanRow._make, self._page(
            self.sql.scan_other_first, self.sql.scan_other_next, (target_generation,),
            after, limit)))

    def scan_generation(self, generation: int, after: base.RecordKey | None,
                        limit: int) -> list[base.ScanRow]:
        """See :meth:`nexus.store.base.Store.scan_generation`."""
        return list(map(base.ScanRow._make, self._page(
            self.sql.scan_same_first, self.sql.scan_same_next, (generation,), after, limit)))

    def replace_blobs(self, updates: Sequence[base.BlobUpdate], *,
                      state: tuple[str, str] | None = None) -> int:
        """See :meth:`nexus.store.base.Store.replace_blobs`."""
        if not updates:
            if state is not None:
                self.put_state(*state)
            return 0
        base.check_unique_keys(updates)

        def tx(conn: Connection) -> int:
            changed = self._replace_rows(conn, updates)
            if state is not None:
                conn.execute(self.sql.put_state, state)
            return changed

        return self._write(tx)

    # ------------------------------------------------------------------ integrity

    def count_by_header_generation(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.count_by_header_generation`."""
        counts: dict[int, int] = {}
        for head, long_enough, n in self._fetchall(self.sql.header_counts):
            generation = base.header_generation(head, bool(long_enough))
            counts[generation] = counts.get(generation, 0) + int(n)
        return counts

    def generation_mismatches(self, after: base.RecordKey | None,
                              limit: int) -> list[base.GenerationMismatch]:
        """See :meth:`nexus.store.base.Store.generation_mismatches`."""
        rows = self._page(self.sql.mismatches_first, self.sql.mismatches_next, (), after,
                          limit)
        return [base.GenerationMismatch(r[0], r[1], r[2], int(r[3]),
                                        base.header_generation(r[4], bool(r[5])))
                for r in rows]

    def fix_generation_cells(self, mismatches: Sequence[base.GenerationMismatch]) -> int:
        """See :meth:`nexus.store.base.Store.fix_generation_cells`."""
        # A header naming a generation the column cannot hold (none was ever created)
        # is left alone.
        fixes = [(m.header, m.kind, m.path, m.version, m.cell, m.header)
                 for m in mismatches if 0 < m.header < self.dialect.generation_limit]
        if not fixes:
            return 0
        return self._write(lambda conn: executemany(conn, self.sql.fix_cell, fixes))

    # ------------------------------------------------------------------ state

    def get_state(self, key: str) -> str | None:
        """See :meth:`nexus.store.base.Store.get_state`."""
        row = self._fetchone(self.sql.get_state, (key,))
        return None if row is None else str(row[0])

    def states_with_prefix(self, prefix: str) -> dict[str, str]:
        """See :meth:`nexus.store.base.Store.states_with_prefix`."""
        rows = self._fetchall(self.sql.states_with_prefix, (len(prefix), prefix))
        return {str(k): str(v) for k, v in rows}

    def put_state(self, key: str, value: str) -> None:
        """See :meth:`nexus.store.base.Store.put_state`."""
        self._change_state(key, self.sql.put_state, (key, value))

    def swap_state(self, key: str, expected: str | None, value: str) -> bool:
        """See :meth:`nexus.store.base.Store.swap_state`."""
        if expected is None:
            return self._change_state(key, self.sql.create_state, (key, value)) == 1
        return self._change_state(key, self.sql.swap_state, (value, key, expected)) == 1

    def _change_state(self, key: str, statement: str, params: Sequence[Any]) -> int:
        def tx(conn: Connection) -> int:
            changed = max(conn.execute(statement, params).rowcount, 0)
            if changed and self.notify_state is not None:
                # Inside the changing transaction: delivered to listeners at its commit.
                conn.execute(self.notify_state, (key,))
            return changed

        return self._write(tx)

    def wait_for_state_change(self, keys: Collection[str], timeout: float) -> bool:
        """See :meth:`nexus.store.base.Store.wait_for_state_change` (here: cannot tell)."""
        time.sleep(max(timeout, 0.0))
        return False

    def delete_state(self, key: str) -> None:
        """See :meth:`nexus.store.base.Store.delete_state`."""
        self._execute(self.sql.delete_state, (key,))

    # ------------------------------------------------------------------ counters

    def add_encryptions(self, generation: int, n: int) -> None:
        """See :meth:`nexus.store.base.Store.add_encryptions`."""
        if n != 0:
            self._execute(self.sql.add_encryptions, (generation, n))

    def encryption_counts(self) -> dict[int, int]:
        """See :meth:`nexus.store.base.Store.encryption_counts`."""
        return {int(g): int(n) for g, n in self._fetchall(self.sql.encryption_counts)}

    # ------------------------------------------------------------------ housekeeping

    def is_empty(self) -> bool:
        """See :meth:`nexus.store.base.Store.is_empty`."""
        return self._fetchone(self.sql.any_record) is None

    def check_writable(self) -> None:
        """See :meth:`nexus.store.base.Store.check_writable`."""
        self._execute(self.sql.probe, (time.time(),))
