"""Backend-specific store behaviour that the shared conformance suite cannot express."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import psycopg
import pytest

from nexus.store import Store, StoreError, StoreUnavailable, open_store
from nexus.store.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION
from nexus.store.postgres import PostgresStore
from nexus.store.sqlite import SqliteStore
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
