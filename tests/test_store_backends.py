"""Backend-specific store behaviour that the shared conformance suite cannot express."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import pytest

from nexus.store import (
    BlobUpdate,
    SecretRow,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
)
from nexus.store import sql as shared_sql
from nexus.store.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION
from nexus.store.postgres import PostgresStore
from nexus.store.sqlite import RowCache, SqliteStore
from tests import pg

pg_server = pg.pg_server
pg_dsn = pg.pg_dsn


def _seal(version: int) -> tuple[int, bytes]:
    return 1, b"blob-%d" % version


def test_open_store_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown store kind 'mysql'"):
        open_store("mysql", path=tmp_path / "x")
    with pytest.raises(ValueError, match="needs a database file path"):
        open_store("sqlite")
    with pytest.raises(ValueError, match="not a DSN"):
        open_store("sqlite", path=tmp_path / "x.db", dsn="dbname=x")
    with pytest.raises(ValueError, match="needs a DSN"):
        open_store("postgres")
    with pytest.raises(ValueError, match="not a path"):
        open_store("postgres", dsn="dbname=x", path=tmp_path / "x.db")
    with pytest.raises(ValueError, match="file path"):
        SqliteStore.open(":memory:")


# --------------------------------------------------------------------------- sqlite


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "spike.db"
    db.touch(mode=0o644)
    os.chmod(db, 0o644)
    store = SqliteStore.open(db)
    try:
        assert isinstance(store, Store)
        store.put_secret("a", cas=None, max_versions=3, now=1.0, seal=_seal)
        for name in ("spike.db", "spike.db-wal", "spike.db-shm"):
            mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
    finally:
        store.close()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "spike.db")
    try:
        conn = store._writer
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    finally:
        store.close()


def test_sqlite_reads_do_not_queue_behind_a_write(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "spike.db")
    store.put_secret("a", cas=None, max_versions=3, now=1.0, seal=_seal)
    inside = threading.Event()
    release = threading.Event()

    def slow_seal(version: int) -> tuple[int, bytes]:
        inside.set()
        release.wait(10)
        return 1, b"slow"

    writer = threading.Thread(
        target=store.put_secret, args=("a",),
        kwargs={"cas": None, "max_versions": 3, "now": 2.0, "seal": slow_seal},
    )
    writer.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        result: list[bytes | None] = []
        reader = threading.Thread(target=lambda: result.append(store.get_secret("a").blob))
        reader.start()
        reader.join(5)
        assert result == [b"blob-1"]  # the uncommitted version 2 is invisible
        assert time.monotonic() - started < 2
    finally:
        release.set()
        writer.join(10)
    assert store.get_secret("a").blob == b"slow"
    store.close()


def test_sqlite_closed_store_and_garbage_file(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "spike.db")
    store.close()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.get_state("x")
    with pytest.raises(StoreUnavailable):
        store.put_state("x", "y")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 300)
    with pytest.raises(StoreError):
        SqliteStore.open(junk)


def test_sqlite_admits_one_store_per_database(tmp_path: Path) -> None:
    db = tmp_path / "spike.db"
    first = SqliteStore.open(db)
    with pytest.raises(StoreUnavailable, match="in use by another process"):
        SqliteStore.open(db)
    first.close()
    second = SqliteStore.open(db)  # closing released the lock
    second.close()
    assert stat.S_IMODE((tmp_path / "spike.db.lock").stat().st_mode) == 0o600


def test_sqlite_lock_is_released_when_its_process_is_killed(tmp_path: Path) -> None:
    db = tmp_path / "spike.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from nexus.store.sqlite import SqliteStore; "
         f"s = SqliteStore.open({str(db)!r}); print('open', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreUnavailable, match="in use by another process"):
            SqliteStore.open(db)
    finally:
        holder.kill()
        holder.wait(10)
    SqliteStore.open(db).close()  # the kernel dropped the dead process's lock


def test_sqlite_row_cache_never_serves_a_row_older_than_a_finished_write(
        tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "spike.db")
    try:
        def seal(tag: bytes) -> Callable[[int], tuple[int, bytes]]:
            return lambda version: (1, tag + b"-%d" % version)

        store.put_secret("a", cas=None, max_versions=5, now=1.0, seal=seal(b"x"))
        assert store.get_secret("a").blob == b"x-1"
        assert store.get_secret("a") is store.get_secret("a")  # served from the cache
        store.put_secret("a", cas=None, max_versions=5, now=2.0, seal=seal(b"y"))
        assert store.get_secret("a").blob == b"y-2"
        assert store.get_secret("a", 1).blob == b"x-1"
        store.delete_versions("a", [2], now=3.0)
        assert store.get_secret("a").deleted_at == 3.0
        store.undelete_versions("a", [2])
        assert store.get_secret("a").deleted_at is None
        store.destroy_versions("a", [1])
        destroyed = store.get_secret("a", 1)
        assert destroyed.destroyed and destroyed.blob is None
        current = store.get_secret("a")
        store.replace_blobs([BlobUpdate("secret", "a", 2, 1, current.blob or b"",
                                        2, b"z-2")])
        assert store.get_secret("a").blob == b"z-2"
        assert store.get_secret("a").generation == 2
    finally:
        store.close()
    with pytest.raises(StoreUnavailable):
        store.get_secret("a")  # a closed store does not answer from its cache


def test_sqlite_row_cache_under_concurrent_writes(tmp_path: Path) -> None:
    """Readers racing a writer: a read that starts after a put returned sees that put."""
    store = SqliteStore.open(tmp_path / "spike.db")
    store.put_secret("hot", cas=None, max_versions=3, now=1.0, seal=_seal)
    finished = [1]  # highest version whose put_secret has returned
    stop = threading.Event()
    stale: list[tuple[int, int]] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            floor = finished[0]
            seen = store.get_secret("hot").version
            reads[0] += 1
            if seen < floor:
                stale.append((seen, floor))
            time.sleep(0)  # let the writer have the GIL too

    pool = [threading.Thread(target=reader) for _ in range(3)]
    for t in pool:
        t.start()
    try:
        for _ in range(200):
            finished[0] = store.put_secret("hot", cas=None, max_versions=3, now=2.0,
                                           seal=_seal)
    finally:
        stop.set()
        for t in pool:
            t.join(10)
        store.close()
    assert finished[0] == 201
    assert reads[0] > 200
    assert stale == []


def test_sqlite_row_cache_drops_a_row_read_before_a_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deterministic form of the race: a write commits between a reader's SELECT and
    the moment it files the row in the cache; the next read must see the write."""
    store = SqliteStore.open(tmp_path / "spike.db")
    try:
        store.put_secret("a", cas=None, max_versions=5, now=1.0, seal=_seal)
        real = shared_sql.secret_row
        raced: list[int] = []

        def select_then_a_write_commits(row: Sequence[object]) -> SecretRow:
            found = real(row)
            if not raced:
                raced.append(store.put_secret("a", cas=None, max_versions=5, now=2.0,
                                              seal=_seal))
            return found

        monkeypatch.setattr(shared_sql, "secret_row", select_then_a_write_commits)
        assert store.get_secret("a").version == 1  # its SELECT ran before the write
        assert raced == [2]
        assert store.get_secret("a").version == 2
    finally:
        store.close()


def test_row_cache_bounds_and_epochs() -> None:
    row = SecretRow(path="p", version=1, generation=1, blob=b"x" * 100, created_at=0.0,
                    deleted_at=None, destroyed=False)
    cache = RowCache(max_entries=3, max_bytes=350, max_row_bytes=200)
    for i in range(5):
        cache.put((f"p{i}", None), 7, row)
    assert len(cache) == 3  # oldest evicted first
    assert cache.get(("p0", None), 7) is None and cache.get(("p4", None), 7) is row
    assert cache.get(("p4", None), 8) is None  # a newer epoch sees nothing older
    cache.put(("late", None), 6, row)  # read before the last write: not filed
    assert cache.get(("late", None), 6) is None and len(cache) == 3
    cache.put(("new", None), 9, row)  # a newer epoch drops everything older
    assert len(cache) == 1 and cache.get(("p4", None), 9) is None
    big = row._replace(blob=b"x" * 500)
    cache.put(("big", None), 9, big)
    assert cache.get(("big", None), 9) is None  # too big to cache
    small = RowCache(max_entries=10, max_bytes=250, max_row_bytes=200)
    for i in range(4):
        small.put((f"q{i}", None), 1, row)
    assert len(small) == 2  # bounded by bytes (each row ~101 B)
    assert RowCache(max_entries=0).get(("p", None), 0) is None


# --------------------------------------------------------------------------- postgres


def test_postgres_unreachable_is_store_unavailable(tmp_path: Path) -> None:
    dsn = f"host={tmp_path} port=1 dbname=nope user=nobody connect_timeout=2"
    with pytest.raises(StoreUnavailable):
        PostgresStore.open(dsn)


@pytest.mark.postgres
def test_postgres_nodes_starting_together_migrate_once(pg_dsn: str) -> None:
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def node() -> None:
        barrier.wait()
        try:
            opened = PostgresStore.open(pg_dsn)
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            stores.append(opened)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors, errors
        assert len(stores) == 4
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute("SELECT id, version FROM schema_version").fetchall()
        assert rows == [(1, PG_SCHEMA_VERSION)]
        assert isinstance(stores[0], Store)
    finally:
        for s in stores:
            s.close()


@pytest.mark.postgres
def test_postgres_survives_killed_connections(pg_dsn: str) -> None:
    store = PostgresStore.open(pg_dsn)
    try:
        store.put_state("k", "v")
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            deadline = time.monotonic() + 10
            while admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone() != (0,) and time.monotonic() < deadline:
                time.sleep(0.02)
        # The pooled connection is dead: it is noticed and replaced, the call succeeds.
        assert store.get_state("k") == "v"
        store.put_state("k", "w")
        assert store.get_state("k") == "w"
    finally:
        store.close()


def test_pg_helper_reports_missing_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.pg.glob.glob", lambda pattern: [])
    monkeypatch.setattr("tests.pg.shutil.which", lambda name: None)
    with pytest.raises(pg.PgUnavailable, match=r"install-postgres\.sh"):
        pg.find_bindir()
