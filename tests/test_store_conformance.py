"""One conformance suite for every Store backend (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from nexus.store import (
    KIND_POLICY,
    KIND_SECRET,
    BlobUpdate,
    CasMismatch,
    ConstraintViolation,
    NotFound,
    PutRequest,
    RecordKey,
    SchemaTooNew,
    Store,
    StoreError,
    open_store,
)
from nexus.store import postgres as pg_backend
from nexus.store import sqlite as sqlite_backend
from tests import pg

pg_server = pg.pg_server
pg_dsn = pg.pg_dsn

BIG = 1_000_000


@dataclass
class Backend:
    """How to (re)open one backend's database and poke at it behind the store's back."""

    name: str
    open: Callable[[], Store]
    raw: Callable[[str, tuple[object, ...]], list[tuple[object, ...]]]
    versions_sql: str
    bump_sql: str
    known_version: int

    def secret_versions(self, path: str) -> list[int]:
        """Versions physically present in the records table (pruned ones must be gone)."""
        return [int(str(r[0])) for r in self.raw(self.versions_sql, (path,))]

    def set_schema_version(self, version: int) -> None:
        """Write a schema version directly into the database."""
        self.raw(self.bump_sql, (version,))


def _sqlite_backend(path: Path) -> Backend:
    def raw(query: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(path)
        try:
            with conn:
                return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    return Backend(
        "sqlite", lambda: open_store("sqlite", path=path), raw,
        "SELECT version FROM records WHERE kind = 'secret' AND path = ? ORDER BY version",
        "UPDATE schema_version SET version = ?",
        sqlite_backend.SCHEMA_VERSION,
    )


def _pg_backend(dsn: str) -> Backend:
    def raw(query: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
        with psycopg.connect(dsn) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    return Backend(
        "postgres", lambda: open_store("postgres", dsn=dsn), raw,
        "SELECT version FROM records WHERE kind = 'secret' AND path = %s ORDER BY version",
        "UPDATE schema_version SET version = %s",
        pg_backend.SCHEMA_VERSION,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite_backend(tmp_path / "spike.db")
    return _pg_backend(request.getfixturevalue("pg_dsn"))


@pytest.fixture()
def store(backend: Backend) -> Iterator[Store]:
    opened = backend.open()
    yield opened
    opened.close()


def sealer(generation: int = 1, tag: bytes = b"v") -> Callable[[int], tuple[int, bytes]]:
    """A fake encryption that binds the version into the blob, as the real one does."""

    def seal(version: int) -> tuple[int, bytes]:
        return generation, tag + b":" + str(version).encode()

    return seal


def put(store: Store, path: str, *, cas: int | None = None, max_versions: int = 10,
        now: float = 100.0, generation: int = 1, tag: bytes = b"v") -> int:
    return store.put_secret(path, cas=cas, max_versions=max_versions, now=now,
                            seal=sealer(generation, tag))


# --------------------------------------------------------------------------- secrets


def test_put_and_get(store: Store) -> None:
    assert store.is_empty()
    assert put(store, "app/db", now=10.0) == 1
    assert put(store, "app/db", now=11.0) == 2
    assert not store.is_empty()
    cur = store.get_secret("app/db")
    assert (cur.path, cur.version, cur.generation, cur.blob) == ("app/db", 2, 1, b"v:2")
    assert cur.created_at == 11.0 and not cur.deleted and not cur.destroyed
    assert cur.key == RecordKey(KIND_SECRET, "app/db", 2)
    assert store.get_secret("app/db", 1).blob == b"v:1"
    meta = store.secret_meta("app/db")
    assert (meta.current_version, meta.oldest_version) == (2, 1)
    assert (meta.created_at, meta.updated_at) == (10.0, 11.0)
    assert [v.version for v in meta.versions] == [1, 2]


def test_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_secret("nope")
    with pytest.raises(NotFound):
        store.secret_meta("nope")
    put(store, "x")
    with pytest.raises(NotFound):
        store.get_secret("x", 2)
    with pytest.raises(NotFound):
        store.delete_versions("nope", [], 1.0)
    with pytest.raises(NotFound):
        store.undelete_versions("nope", [1])
    with pytest.raises(NotFound):
        store.destroy_versions("nope", [1])


def test_pruning_really_deletes_rows(store: Store, backend: Backend) -> None:
    for _ in range(5):
        put(store, "p", max_versions=3)
    put(store, "other", max_versions=3)
    assert backend.secret_versions("p") == [3, 4, 5]
    meta = store.secret_meta("p")
    assert (meta.current_version, meta.oldest_version) == (5, 3)
    assert [v.version for v in meta.versions] == [3, 4, 5]
    with pytest.raises(NotFound):
        store.get_secret("p", 2)
    # A smaller retention prunes harder; a larger one never resurrects anything.
    put(store, "p", max_versions=1)
    assert backend.secret_versions("p") == [6]
    put(store, "p", max_versions=10)
    assert backend.secret_versions("p") == [6, 7]
    assert store.secret_meta("p").oldest_version == 6
    with pytest.raises(ValueError, match="max_versions"):
        put(store, "p", max_versions=0)


def test_cas_semantics(store: Store) -> None:
    assert put(store, "c", cas=0) == 1
    with pytest.raises(CasMismatch) as info:
        put(store, "c", cas=0)
    assert (info.value.expected, info.value.actual) == (0, 1)
    assert put(store, "c", cas=1) == 2
    with pytest.raises(CasMismatch) as info:
        put(store, "c", cas=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    with pytest.raises(CasMismatch):
        put(store, "fresh", cas=3)
    with pytest.raises(NotFound):
        store.secret_meta("fresh")
    assert put(store, "c", cas=None) == 3
    with pytest.raises(ValueError, match="cas"):
        put(store, "c", cas=-1)


def test_seal_gets_version_and_failure_rolls_back(store: Store, backend: Backend) -> None:
    seen: list[int] = []

    def seal(version: int) -> tuple[int, bytes]:
        seen.append(version)
        return 7, b"blob"

    put(store, "s")
    assert store.put_secret("s", cas=1, max_versions=5, now=1.0, seal=seal) == 2
    assert seen == [2]
    assert store.get_secret("s").generation == 7

    def boom(version: int) -> tuple[int, bytes]:
        raise RuntimeError("encryption failed")

    with pytest.raises(RuntimeError, match="encryption failed"):
        store.put_secret("s", cas=None, max_versions=5, now=1.0, seal=boom)
    with pytest.raises(RuntimeError):
        store.put_secret("new", cas=None, max_versions=5, now=1.0, seal=boom)
    assert store.secret_meta("s").current_version == 2
    assert backend.secret_versions("s") == [1, 2]
    assert store.list_secret_paths("") == ["s"]


def test_put_secrets_one_commit_each_request_on_its_own(store: Store,
                                                        backend: Backend) -> None:
    put(store, "taken")
    requests = [
        PutRequest("a", None, 10, 5.0, sealer(tag=b"a")),
        PutRequest("taken", 0, 10, 5.0, sealer()),          # refused: exists
        PutRequest("a", 1, 10, 6.0, sealer(tag=b"a2")),     # sees the first one
        PutRequest("b", 0, 10, 7.0, sealer(tag=b"b")),
    ]
    outcomes = store.put_secrets(requests)
    assert outcomes[0] == 1 and outcomes[2] == 2 and outcomes[3] == 1
    refused = outcomes[1]
    assert isinstance(refused, CasMismatch)
    assert (refused.expected, refused.actual) == (0, 1)
    assert store.get_secret("a").blob == b"a2:2"
    assert store.get_secret("a", 1).blob == b"a:1"
    assert store.get_secret("b").blob == b"b:1"
    assert backend.secret_versions("taken") == [1]
    assert store.put_secrets([]) == []


def test_put_secrets_a_large_batch_of_new_and_old_paths(store: Store, backend: Backend) -> None:
    """A batch big enough for SQLite's bulk write of new paths: new paths get version 1 in
    order with everything else, and every other case still has its own outcome."""
    put(store, "old")
    requests = [PutRequest(f"new/{i}", None if i % 2 else 0, 3, 9.0, sealer(tag=b"n"))
                for i in range(20)]
    requests += [
        PutRequest("old", None, 3, 9.0, sealer(tag=b"o")),       # exists: version 2
        PutRequest("twice", None, 3, 9.0, sealer(tag=b"t1")),    # named twice in the batch
        PutRequest("twice", 1, 3, 9.0, sealer(tag=b"t2")),
        PutRequest("ghost", 4, 3, 9.0, sealer()),                # CAS 4 on a new path
    ]
    outcomes = store.put_secrets(requests)
    assert outcomes[:20] == [1] * 20
    assert outcomes[20:23] == [2, 1, 2]
    refused = outcomes[23]
    assert isinstance(refused, CasMismatch) and (refused.expected, refused.actual) == (4, 0)
    assert store.list_secret_paths("ghost") == []
    for i in range(20):
        row = store.get_secret(f"new/{i}")
        assert (row.version, row.blob, row.created_at) == (1, b"n:1", 9.0)
        meta = store.secret_meta(f"new/{i}")
        assert (meta.current_version, meta.oldest_version) == (1, 1)
        assert (meta.created_at, meta.updated_at) == (9.0, 9.0)
    assert store.get_secret("twice").blob == b"t2:2"
    assert store.get_secret("old").blob == b"o:2"
    assert backend.secret_versions("new/3") == [1]
    again = store.put_secrets([PutRequest(f"new/{i}", 0, 3, 10.0, sealer()) for i in range(20)])
    assert all(isinstance(o, CasMismatch) for o in again)


def test_put_secrets_failure_rolls_back_the_whole_batch(store: Store,
                                                        backend: Backend) -> None:
    def boom(version: int) -> tuple[int, bytes]:
        raise RuntimeError("encryption failed")

    with pytest.raises(RuntimeError, match="encryption failed"):
        store.put_secrets([PutRequest("x", None, 10, 1.0, sealer()),
                           PutRequest("y", None, 10, 1.0, boom)])
    assert store.list_secret_paths("") == []
    assert backend.secret_versions("x") == []
    with pytest.raises(ValueError, match="max_versions"):
        store.put_secrets([PutRequest("x", None, 0, 1.0, sealer())])


def test_soft_delete_undelete_destroy(store: Store) -> None:
    for _ in range(3):
        put(store, "d")
    assert store.delete_versions("d", [], 50.0) == 1  # empty = current
    assert store.get_secret("d").deleted_at == 50.0
    assert store.delete_versions("d", [3], 60.0) == 0  # already deleted
    assert store.get_secret("d").deleted_at == 50.0
    assert store.delete_versions("d", [1, 2, 99], 70.0) == 2  # unknown versions ignored
    assert store.undelete_versions("d", [1, 3]) == 2
    assert not store.get_secret("d", 1).deleted
    assert store.get_secret("d", 2).deleted
    assert store.destroy_versions("d", [2, 3]) == 2
    gone = store.get_secret("d", 3)
    assert gone.destroyed and gone.blob is None
    assert store.destroy_versions("d", [3]) == 0
    assert store.undelete_versions("d", [2]) == 0  # destroyed stays destroyed
    meta = store.secret_meta("d")
    assert [(v.version, v.deleted_at is not None, v.destroyed) for v in meta.versions] == [
        (1, False, False), (2, True, True), (3, False, True)]
    assert store.count_by_generation() == {1: 1}
    # Writing again works after deletes and destroys.
    assert put(store, "d", cas=3) == 4
    with pytest.raises(ValueError):
        store.undelete_versions("d", [])
    with pytest.raises(ValueError):
        store.destroy_versions("d", [])


def test_list_by_prefix(store: Store) -> None:
    for path in ["b", "a/c", "a/b", "ab/x", "a%/y", "a_/z", "a/b/deep"]:
        put(store, path)
    assert store.list_secret_paths("") == sorted(
        ["b", "a/c", "a/b", "ab/x", "a%/y", "a_/z", "a/b/deep"])
    assert store.list_secret_paths("a/") == ["a/b", "a/b/deep", "a/c"]
    assert store.list_secret_paths("a") == ["a%/y", "a/b", "a/b/deep", "a/c", "a_/z", "ab/x"]
    assert store.list_secret_paths("a%") == ["a%/y"]  # literal, no wildcard
    assert store.list_secret_paths("a_") == ["a_/z"]
    assert store.list_secret_paths("zzz") == []
    store.delete_versions("b", [], 1.0)
    store.destroy_versions("b", [1])
    assert "b" in store.list_secret_paths("")  # documented: listed while metadata exists


def test_list_pages_by_keyset(store: Store, backend: Backend) -> None:
    """after/limit resume a listing from its last path (byte order on every backend): no
    path that exists throughout is repeated or skipped, whatever changes between pages."""
    paths = ["k/a", "k/b", "k/B", "k/b/c", "k/b-", "k/z", "k.", "k/\u00e9", "ka"]
    for path in paths:
        put(store, path)
    in_prefix = sorted((p for p in paths if p.startswith("k/")), key=str.encode)
    assert store.list_secret_paths("k/") == in_prefix
    assert store.list_secret_paths("k/", limit=2) == in_prefix[:2]
    pages: list[str] = []
    after: str | None = None
    while True:
        page = store.list_secret_paths("k/", after=after, limit=2)
        pages.extend(page)
        if len(page) < 2:
            break
        after = page[-1]
    assert pages == in_prefix
    # After a cursor that is not itself a stored path; after the last; outside the prefix.
    assert store.list_secret_paths("k/", after="k/b0") == [p for p in in_prefix
                                                           if p.encode() > b"k/b0"]
    assert store.list_secret_paths("k/", after=in_prefix[-1]) == []
    assert store.list_secret_paths("k/", after="a") == in_prefix
    # Paths added before and after the cursor, one removed: the listing goes on from it.
    first = store.list_secret_paths("k/", limit=3)
    put(store, "k/0-before")
    put(store, "k/zz-after")
    backend.raw("DELETE FROM secret_meta WHERE path = ?" if backend.name == "sqlite"
                else "DELETE FROM secret_meta WHERE path = %s", ("k/z",))
    rest = store.list_secret_paths("k/", after=first[-1])
    assert "k/0-before" not in rest and "k/zz-after" in rest and "k/z" not in rest
    assert first + [p for p in rest if p != "k/zz-after"] == [p for p in in_prefix
                                                             if p != "k/z"]
    with pytest.raises(ValueError):
        store.list_secret_paths("k/", limit=0)


# --------------------------------------------------------------------------- policies


def test_policies(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_policy("ops")
    store.put_policy("ops", 1, b"p1", 5.0)
    store.put_policy("admins", 1, b"p2", 6.0)
    put(store, "ops")  # same name as a secret path: separate kinds never collide
    got = store.get_policy("ops")
    assert (got.kind, got.path, got.version, got.generation, got.blob) == (
        KIND_POLICY, "ops", 0, 1, b"p1")
    store.put_policy("ops", 2, b"p1b", 9.0)
    got = store.get_policy("ops")
    assert (got.generation, got.blob, got.created_at) == (2, b"p1b", 5.0)
    assert [p.path for p in store.list_policies()] == ["admins", "ops"]
    assert store.delete_policy("ops") is True
    assert store.delete_policy("ops") is False
    assert [p.path for p in store.list_policies()] == ["admins"]
    assert store.get_secret("ops").blob == b"v:1"


# --------------------------------------------------------------------------- state, counters


def test_state(store: Store) -> None:
    assert store.get_state("rotation") is None
    store.put_state("rotation", '{"phase": "reencrypt"}')
    assert store.get_state("rotation") == '{"phase": "reencrypt"}'
    store.put_state("rotation", '{"phase": "done"}')
    assert store.get_state("rotation") == '{"phase": "done"}'
    store.delete_state("rotation")
    store.delete_state("rotation")
    assert store.get_state("rotation") is None


def test_swap_state_is_compare_and_set(store: Store) -> None:
    assert store.swap_state("lease", None, "a")
    assert not store.swap_state("lease", None, "b")  # exists now
    assert not store.swap_state("lease", "x", "b")  # stale expectation
    assert store.get_state("lease") == "a"
    assert store.swap_state("lease", "a", "b")
    assert store.get_state("lease") == "b"


def test_swap_state_has_one_winner(store: Store) -> None:
    import threading

    store.put_state("lease", "free")
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        if store.swap_state("lease", "free", f"node-{i}"):
            wins.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get_state("lease") == f"node-{wins[0]}"


def test_encryption_counters(store: Store) -> None:
    assert store.encryption_counts() == {}
    store.add_encryptions(1, 5)
    store.add_encryptions(1, 7)
    store.add_encryptions(2, 3_000_000_000)  # beyond 32 bits
    store.add_encryptions(3, 0)
    assert store.encryption_counts() == {1: 12, 2: 3_000_000_000}


def test_check_writable_and_empty(store: Store) -> None:
    store.check_writable()
    store.check_writable()
    assert store.is_empty()
    store.put_policy("p", 1, b"x", 1.0)
    assert not store.is_empty()


# --------------------------------------------------------------------------- rotation support


def _fill_for_rotation(store: Store) -> None:
    for i in range(7):
        put(store, f"s/{i}", generation=1)
    put(store, "s/3", generation=2)  # s/3 v2 already under the new generation
    store.destroy_versions("s/5", [1])  # no blob: never scanned
    store.put_policy("pa", 1, b"pa", 1.0)
    store.put_policy("pb", 2, b"pb", 1.0)


def _scan_all(scan: Callable[[RecordKey | None, int], list[object]], limit: int) -> list[object]:
    out: list[object] = []
    after: RecordKey | None = None
    while True:
        page = scan(after, limit)
        assert len(page) <= limit
        if not page:
            return out
        out.extend(page)
        after = page[-1].key  # type: ignore[attr-defined]


def test_count_and_scan_pagination(store: Store) -> None:
    _fill_for_rotation(store)
    assert store.count_by_generation() == {1: 7, 2: 2}
    rows = _scan_all(lambda a, n: list(store.scan_not_in_generation(2, a, n)), 3)
    keys = [r.key for r in rows]  # type: ignore[attr-defined]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys) == 7
    assert RecordKey(KIND_POLICY, "pa", 0) in keys
    assert RecordKey(KIND_SECRET, "s/5", 1) not in keys
    assert RecordKey(KIND_SECRET, "s/3", 2) not in keys
    assert all(r.generation == 1 and r.blob for r in rows)  # type: ignore[attr-defined]
    rows2 = _scan_all(lambda a, n: list(store.scan_generation(2, a, n)), 1)
    assert [r.key for r in rows2] == [  # type: ignore[attr-defined]
        RecordKey(KIND_POLICY, "pb", 0), RecordKey(KIND_SECRET, "s/3", 2)]
    assert store.scan_not_in_generation(1, None, 100)[0].generation == 2
    with pytest.raises(ValueError):
        store.scan_generation(1, None, 0)


def test_replace_blobs_is_conditional(store: Store) -> None:
    _fill_for_rotation(store)
    rows = store.scan_not_in_generation(2, None, 100)
    # Meanwhile users write: a policy replaced, a version destroyed, a secret deleted.
    store.put_policy("pa", 2, b"pa-user", 2.0)
    store.destroy_versions("s/0", [1])
    store.delete_versions("s/1", [1], 3.0)
    updates = [BlobUpdate(*r.key, r.generation, r.blob or b"", 2, b"re:" + (r.blob or b""))
               for r in rows]
    # s/2 was re-encrypted by someone else already (different generation): not touched.
    s2 = next(u for u in updates if u.key.path == "s/2")
    assert store.replace_blobs([BlobUpdate(*s2.key, 1, s2.expected_blob, 3, b"other")]) == 1
    changed = store.replace_blobs(updates)
    assert changed == len(updates) - 3  # pa, s/0 and s/2 lost the race
    assert store.get_policy("pa").blob == b"pa-user"
    assert store.get_secret("s/0", 1).blob is None
    assert store.get_secret("s/2", 1).blob == b"other"
    assert store.get_secret("s/2", 1).generation == 3
    s1 = store.get_secret("s/1", 1)  # a soft delete does not change the ciphertext
    assert (s1.blob, s1.generation, s1.deleted_at) == (b"re:v:1", 2, 3.0)
    assert store.count_by_generation() == {2: 7, 3: 1}
    assert store.scan_not_in_generation(2, None, 100)[0].key.path == "s/2"
    assert store.replace_blobs(updates) == 0  # idempotent: nothing matches any more
    assert store.replace_blobs([]) == 0
    with pytest.raises(ValueError, match="duplicate"):
        store.replace_blobs([updates[1], updates[1]])


def test_replace_blobs_writes_its_progress_in_the_same_transaction(store: Store) -> None:
    _fill_for_rotation(store)
    rows = store.scan_not_in_generation(2, None, 3)
    updates = [BlobUpdate(*r.key, r.generation, r.blob or b"", 2, b"new") for r in rows]
    assert store.replace_blobs(updates, state=("rotation", '{"cursor": 3}')) == len(updates)
    assert store.get_state("rotation") == '{"cursor": 3}'
    # A refused batch leaves the progress document as it was.
    with pytest.raises(ValueError):
        store.replace_blobs([updates[0], updates[0]], state=("rotation", '{"cursor": 9}'))
    assert store.get_state("rotation") == '{"cursor": 3}'
    assert store.replace_blobs([], state=("rotation", '{"cursor": 4}')) == 0
    assert store.get_state("rotation") == '{"cursor": 4}'


# --------------------------------------------------------------------------- schema, durability


def test_schema_too_new_is_refused(backend: Backend) -> None:
    first = backend.open()
    put(first, "keep")
    first.close()
    backend.set_schema_version(backend.known_version + 1)
    with pytest.raises(SchemaTooNew) as info:
        backend.open()
    assert (info.value.found, info.value.known) == (backend.known_version + 1,
                                                     backend.known_version)
    backend.set_schema_version(backend.known_version)
    again = backend.open()
    assert again.get_secret("keep").blob == b"v:1"
    again.close()


def test_reopen_keeps_everything(backend: Backend) -> None:
    first = backend.open()
    put(first, "a/b", tag=b"x")
    put(first, "a/b", tag=b"y")
    first.put_policy("ops", 1, b"pol", 1.0)
    first.put_state("k", "v")
    first.add_encryptions(1, 3)
    first.close()
    second = backend.open()  # migrations already applied: a no-op
    assert second.get_secret("a/b").blob == b"y:2"
    assert second.get_secret("a/b", 1).blob == b"x:1"
    assert second.get_policy("ops").blob == b"pol"
    assert second.get_state("k") == "v"
    assert second.encryption_counts() == {1: 3}
    assert second.list_secret_paths("a/") == ["a/b"]
    second.close()


# --------------------------------------------------------------------------- concurrency


def _cas_writers(stores: list[Store], path: str, threads: int, writes: int) -> list[int]:
    won: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(store: Store) -> None:
        try:
            start.wait()
            for _ in range(writes):
                while True:
                    try:
                        current = store.secret_meta(path).current_version
                    except NotFound:
                        current = 0
                    try:
                        version = put(store, path, cas=current, max_versions=BIG)
                    except CasMismatch:
                        continue
                    with lock:
                        won.append(version)
                    break
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(stores[i % len(stores)],))
            for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert not errors, errors
    return won


def test_concurrent_cas_writers_never_lose_updates(store: Store, backend: Backend) -> None:
    won = _cas_writers([store], "hot", threads=8, writes=50)
    assert sorted(won) == list(range(1, 401))
    assert backend.secret_versions("hot") == list(range(1, 401))
    assert store.secret_meta("hot").current_version == 400


def test_two_store_instances_share_one_database(backend: Backend) -> None:
    """Two opened stores (two Nexus nodes / processes) on the same database: PostgreSQL
    only; SQLite admits one store per file (tests/test_store_backends.py)."""
    if backend.name == "sqlite":
        pytest.skip("one store per SQLite database by design")
    first, second = backend.open(), backend.open()
    try:
        won = _cas_writers([first, second], "shared", threads=4, writes=15)
        assert sorted(won) == list(range(1, 61))
        assert backend.secret_versions("shared") == list(range(1, 61))
    finally:
        first.close()
        second.close()


def test_concurrent_create_only_has_one_winner(store: Store) -> None:
    winners: list[int] = []
    losers: list[int] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        try:
            winners.append(put(store, "once", cas=0))
        except CasMismatch as exc:
            losers.append(exc.actual)

    pool = [threading.Thread(target=worker) for _ in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert winners == [1]
    assert losers == [1] * 7


def test_unconditional_concurrent_writes_get_distinct_versions(store: Store) -> None:
    versions: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            v = put(store, "free", max_versions=BIG)
            with lock:
                versions.append(v)

    pool = [threading.Thread(target=worker) for _ in range(6)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert sorted(versions) == list(range(1, 151))


# --------------------------------------------------------------------------- metadata integrity


def _envelope(generation: int, tag: bytes = b"x") -> bytes:
    """A blob shaped like a real envelope header (format 1, generation, 33+ bytes)."""
    return bytes([1]) + generation.to_bytes(4, "big") + b"\0" * 28 + tag


def _sql(backend: Backend, query: str) -> str:
    return query if backend.name == "sqlite" else query.replace("?", "%s")


def test_inconsistent_metadata_is_refused_and_nothing_is_deleted(store: Store,
                                                                 backend: Backend) -> None:
    from nexus.store.base import InconsistentMetadata

    for path in ("bad/oldest", "bad/lost", "bad/behind"):
        for _ in range(3):
            put(store, path)
    backend.raw(_sql(backend, "UPDATE secret_meta SET oldest_version = 99 WHERE path = ?"),
                ("bad/oldest",))
    backend.raw(_sql(backend, "DELETE FROM secret_meta WHERE path = ?"), ("bad/lost",))
    backend.raw(_sql(backend, "UPDATE secret_meta SET current_version = 1 WHERE path = ?"),
                ("bad/behind",))
    for path, reason in (("bad/oldest", "oldest retained version (99)"),
                         ("bad/lost", "no metadata"),
                         ("bad/behind", "version 3 is stored")):
        with pytest.raises(InconsistentMetadata) as info:
            put(store, path, max_versions=2)
        assert info.value.path == path and reason in info.value.reason
        assert backend.secret_versions(path) == [1, 2, 3]
    with pytest.raises(InconsistentMetadata):
        store.secret_meta("bad/oldest")
    put(store, "bad/huge")
    backend.raw(_sql(backend, "UPDATE secret_meta SET current_version = ? WHERE path = ?"),
                (2**31 - 1, "bad/huge"))
    with pytest.raises(InconsistentMetadata):
        put(store, "bad/huge")
    assert backend.secret_versions("bad/huge") == [1]
    # The missing row was not recreated by the refused put.
    assert "bad/lost" not in store.list_secret_paths("bad/")
    assert put(store, "good", max_versions=2) == 1


def test_generation_cells_against_headers(store: Store, backend: Backend) -> None:
    def enveloped(i: int) -> Callable[[int], tuple[int, bytes]]:
        return lambda version: (1, _envelope(1, str(i).encode()))

    for i in range(5):
        store.put_secret(f"g/{i}", cas=None, max_versions=10, now=1.0, seal=enveloped(i))
    store.put_policy("pol", 1, _envelope(1, b"p"), 1.0)
    assert store.count_by_header_generation() == {1: 6}
    assert store.generation_mismatches(None, 10) == []
    backend.raw(_sql(backend, "UPDATE records SET generation = 7 WHERE path = ?"), ("g/1",))
    backend.raw(_sql(backend, "UPDATE records SET generation = 2 WHERE path = ?"), ("pol",))
    backend.raw(_sql(backend, "UPDATE records SET blob = ? WHERE path = ?"),
                (_envelope(0), "g/3"))  # generation 0: no valid header
    backend.raw(_sql(backend, "UPDATE records SET blob = ? WHERE path = ?"), (b"short", "g/4"))
    assert store.count_by_generation() == {1: 4, 2: 1, 7: 1}
    assert store.count_by_header_generation() == {1: 4, 0: 2}
    found = store.generation_mismatches(None, 10)
    assert [(m.kind, m.path, m.cell, m.header) for m in found] == [
        ("policy", "pol", 2, 1), ("secret", "g/1", 7, 1), ("secret", "g/3", 1, 0),
        ("secret", "g/4", 1, 0)]
    # Keyset pages.
    assert store.generation_mismatches(None, 1) == found[:1]
    assert store.generation_mismatches(found[1].key, 10) == found[2:]
    # Only cells with a valid header change, and only if the row is still as found.
    stale = found[0]._replace(cell=5)
    assert store.fix_generation_cells([stale]) == 0
    assert store.fix_generation_cells(found) == 2
    assert store.count_by_generation() == {1: 6}
    assert [m.path for m in store.generation_mismatches(None, 10)] == ["g/3", "g/4"]
    assert store.get_secret("g/1").blob == _envelope(1, b"1")  # the blob never changes


# --------------------------------------------------------------------------- driver errors


def test_a_broken_constraint_is_a_store_error_not_a_driver_exception(
        store: Store, backend: Backend) -> None:
    """A database edited behind the store's back (here: a unique index no write expects)
    makes a write fail with the store's own error; the driver's exception stays inside."""
    backend.raw("CREATE UNIQUE INDEX one_owner ON state (value)", ())
    store.put_state("lease/a", "node-1")
    with pytest.raises(ConstraintViolation) as info:
        store.put_state("lease/b", "node-1")
    assert isinstance(info.value, StoreError)
    assert not isinstance(info.value, sqlite3.Error | psycopg.Error)
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError | psycopg.IntegrityError)
    assert str(info.value).startswith(f"{backend.name}: ")
    assert "\n" not in str(info.value)  # no detail lines (they may quote the row)
    # Mid-transaction: the batch that came before the failing statement is rolled back.
    put(store, "s", tag=b"old")
    row = store.scan_not_in_generation(2, None, 10)[0]
    with pytest.raises(ConstraintViolation):
        store.replace_blobs([BlobUpdate(*row.key, row.generation, row.blob, 2, b"new")],
                            state=("lease/c", "node-1"))
    assert store.get_secret("s").blob == b"old:1"
    assert store.get_state("lease/b") is None and store.get_state("lease/c") is None
    # The store goes on working.
    assert store.swap_state("lease/b", None, "node-2")
    assert store.get_state("lease/b") == "node-2"
