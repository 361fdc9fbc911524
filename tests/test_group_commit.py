"""Group commit of puts on SQLite: concurrent puts share one transaction (one fsync), each
caller gets exactly its own outcome, and only once the commit holding its version is durable.

Store-level tests use a real SQLite file and real threads, and hold a put transaction just
before its COMMIT with the store's ``put_commit_hook`` so that followers queue behind it
whatever the machine's speed (no test here waits a number of seconds). Server-level tests run
the real ``spike-nexus``: 8 writers x 200 check-and-set writes with group commit on, and a
put acknowledged before a kill -9 that must be there after a restart.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from nexus.store import CasMismatch, NotFound, StoreUnavailable
from nexus.store.sqlite import SqliteStore
from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import secrets_pb2, secrets_pb2_grpc
from tests import test_concurrency
from tests.harness import (
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    eventually,
    pilot,
    short_tmpdir,
    start_unsealed,
)

pytestmark = pytest.mark.timeout(900)
TLS_NAME = "nexus.spike.internal"
HOLD = 300.0  # a bound against a hang, never a wait for something to happen


def blob_for(path: str, version: int, tag: str = "") -> bytes:
    return b"\x01\x00\x00\x00\x01" + f"{path}#{version}{tag}".encode() * 4


def sealer(path: str, tag: str = "") -> Callable[[int], tuple[int, bytes]]:
    return lambda version: (1, blob_for(path, version, tag))


class Gate:
    """``put_commit_hook``: records each put transaction's size; the transactions whose
    ordinal is in ``hold`` (0 = the first) wait there, before COMMIT, until released."""

    def __init__(self, hold: set[int]) -> None:
        self.sizes: list[int] = []
        self.hold = hold
        self.reached = threading.Semaphore(0)
        self.opened = {i: threading.Event() for i in hold}
        self.fail: Callable[[int], None] | None = None

    def __call__(self, size: int) -> None:
        self.sizes.append(size)
        ordinal = len(self.sizes) - 1
        if self.fail is not None:
            self.fail(size)
        if ordinal in self.opened:
            self.reached.release()
            assert self.opened[ordinal].wait(HOLD)

    def wait_reached(self) -> None:
        assert self.reached.acquire(timeout=HOLD)

    def open(self, ordinal: int) -> None:
        self.opened[ordinal].set()


@pytest.fixture()
def store(tmp: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore.open(tmp / "spike.db")
    yield opened
    opened.close()


class Puts:
    """Puts started in threads; each one's outcome (version or exception) by name."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.outcomes: dict[str, int | BaseException] = {}
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, name: str, path: str, *, cas: int | None = None,
              seal: Callable[[int], tuple[int, bytes]] | None = None) -> None:
        def run() -> None:
            try:
                outcome: int | BaseException = self.store.put_secret(
                    path, cas=cas, max_versions=10, now=1.0, seal=seal or sealer(path))
            except Exception as exc:
                outcome = exc
            with self._lock:
                self.outcomes[name] = outcome

        thread = threading.Thread(target=run)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(HOLD)
            assert not thread.is_alive()


def committed(db: Path, path: str) -> list[tuple[int, bytes]]:
    """The versions of ``path`` another connection sees (committed data only)."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT version, blob FROM records WHERE kind = 'secret'"
                            " AND path = ? ORDER BY version", (path,)).fetchall()
    finally:
        conn.close()
    return [(int(v), bytes(b)) for v, b in rows]


def queue_behind_held_leader(store: SqliteStore, gate: Gate, puts: Puts,
                             followers: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Start a leader put on ``lead/path``, hold it before its COMMIT, queue ``followers``."""
    store.put_commit_hook = gate
    puts.start("leader", "lead/path")
    gate.wait_reached()
    for name, path, extra in followers:
        puts.start(name, path, **extra)
    eventually(lambda: store.pending_puts() == len(followers), "the followers to queue")
    assert puts.outcomes == {}, "a put returned while the commit ahead of it was held"


def test_concurrent_puts_share_one_commit_and_return_after_it(store: SqliteStore,
                                                              tmp: Path) -> None:
    gate = Gate(hold={0, 1})
    puts = Puts(store)
    followers: list[tuple[str, str, dict[str, Any]]] = [
        (f"f{i}", f"app/s{i}", {}) for i in range(5)]
    queue_behind_held_leader(store, gate, puts, followers)

    gate.open(0)  # the leader commits alone; one follower takes the lead for the other four
    gate.wait_reached()  # ... and holds all five in one transaction, before its COMMIT
    eventually(lambda: "leader" in puts.outcomes, "the leader to return")
    assert set(puts.outcomes) == {"leader"}, "a follower returned before its commit"
    assert committed(tmp / "spike.db", "app/s0") == []  # not committed yet: not visible
    gate.open(1)
    puts.join()

    assert gate.sizes == [1, 5], gate.sizes  # two transactions for six puts
    assert puts.outcomes == {"leader": 1, **{name: 1 for name, _, _ in followers}}
    for _, path, _ in followers:
        assert committed(tmp / "spike.db", path) == [(1, blob_for(path, 1))]
        assert store.get_secret(path).blob == blob_for(path, 1)


def test_each_put_gets_its_own_outcome_in_a_shared_commit(store: SqliteStore,
                                                          tmp: Path) -> None:
    store.put_secret("app/taken", cas=None, max_versions=10, now=1.0, seal=sealer("app/taken"))

    def broken_seal(version: int) -> tuple[int, bytes]:
        raise RuntimeError("this caller's keyring is gone")

    gate = Gate(hold={0})
    puts = Puts(store)
    queue_behind_held_leader(store, gate, puts, [
        ("ok1", "app/a", {}),
        ("broken", "app/b", {"seal": broken_seal}),
        ("conflict", "app/taken", {"cas": 0}),
        ("same-path-1", "app/c", {}),
        ("same-path-2", "app/c", {"cas": 1}),  # applied after the one before it
        ("ok2", "app/d", {}),
    ])
    gate.open(0)
    puts.join()

    assert gate.sizes == [1, 6], "one shared transaction; no put was retried alone"
    out = puts.outcomes
    assert isinstance(out.pop("broken"), RuntimeError)
    conflict = out.pop("conflict")
    assert isinstance(conflict, CasMismatch) and (conflict.expected, conflict.actual) == (0, 1)
    assert out == {"leader": 1, "ok1": 1, "same-path-1": 1, "same-path-2": 2, "ok2": 1}
    assert committed(tmp / "spike.db", "app/b") == []
    assert [v for v, _ in committed(tmp / "spike.db", "app/c")] == [1, 2]
    assert store.secret_meta("app/taken").current_version == 1


def test_a_batch_that_fails_as_a_whole_runs_each_put_alone(store: SqliteStore,
                                                           tmp: Path) -> None:
    gate = Gate(hold={0})
    puts = Puts(store)
    followers: list[tuple[str, str, dict[str, Any]]] = [
        (f"f{i}", f"app/s{i}", {}) for i in range(4)]
    queue_behind_held_leader(store, gate, puts, followers)

    def fail_shared(size: int) -> None:
        if size > 1:  # the shared transaction breaks (as a full disk would); alone it works
            raise StoreUnavailable("sqlite: database or disk is full")

    gate.fail = fail_shared
    gate.open(0)
    puts.join()

    assert gate.sizes == [1, 4, 1, 1, 1, 1], gate.sizes
    assert puts.outcomes == {"leader": 1, **{name: 1 for name, _, _ in followers}}
    for _, path, _ in followers:
        assert committed(tmp / "spike.db", path) == [(1, blob_for(path, 1))]


def test_group_commit_off_commits_each_put_alone(tmp: Path) -> None:
    store = SqliteStore.open(tmp / "spike.db", group_commit=False)
    try:
        gate = Gate(hold=set())
        store.put_commit_hook = gate
        with ThreadPoolExecutor(4) as pool:
            versions = list(pool.map(lambda i: store.put_secret(
                f"p/{i % 3}", cas=None, max_versions=100, now=1.0,
                seal=sealer(f"p/{i % 3}")), range(30)))
        assert gate.sizes == [1] * 30
        assert store.pending_puts() == 0
        assert sorted(versions) == sorted([v for p in range(3) for v in range(1, 11)])
    finally:
        store.close()


def test_eight_writers_cas_through_the_store(store: SqliteStore, tmp: Path) -> None:
    """8 threads x 200 check-and-set writes to one path, beside other writes (state swaps, a
    delete and undelete per round) that share the writer: nothing lost, no version twice."""
    writers, writes, path = 8, 200, "race/counter"
    sizes: list[int] = []
    store.put_commit_hook = sizes.append
    start = threading.Barrier(writers + 1)
    stop_other = threading.Event()

    def current() -> int:
        try:
            return store.secret_meta(path).current_version
        except NotFound:
            return 0

    def writer(index: int) -> list[tuple[int, str]]:
        won: list[tuple[int, str]] = []
        start.wait()
        for seq in range(writes):
            tag = f"w{index}-{seq}"
            while True:
                cas = current()
                try:
                    version = store.put_secret(path, cas=cas, max_versions=5000, now=1.0,
                                               seal=sealer(path, tag))
                except CasMismatch:
                    continue
                assert version == cas + 1
                won.append((version, tag))
                break
        return won

    def other_writes() -> int:
        swaps = 0
        start.wait()
        while not stop_other.is_set():
            old = store.get_state("bench.counter")
            if store.swap_state("bench.counter", old, str(int(old or 0) + 1)):
                swaps += 1
            store.put_state("bench.note", f"n{swaps}")
        return swaps

    with ThreadPoolExecutor(writers + 1) as pool:
        other = pool.submit(other_writes)
        results = list(pool.map(writer, range(writers)))
        stop_other.set()
        swaps = other.result()

    total = writers * writes
    won = {v: tag for per in results for v, tag in per}
    assert len(won) == total and sum(len(per) for per in results) == total
    assert sorted(won) == list(range(1, total + 1)), "a version lost or handed out twice"
    stored = committed(tmp / "spike.db", path)
    assert [v for v, _ in stored] == list(range(1, total + 1))
    for version, blob in stored:
        assert blob == blob_for(path, version, won[version])
    assert store.get_state("bench.counter") == str(swaps)
    assert sum(sizes) >= total  # every acknowledged write went through a put transaction


# --------------------------------------------------------------------------- real server


@pytest.fixture()
def group_server(agent: DevAgent) -> Iterator[Nexus]:
    data_dir = short_tmpdir("nxg-")
    running = start_unsealed(agent, data_dir,
                             ["--max-secret-versions", "2000", "--group-commit", "on"])
    yield running
    running.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def test_eight_writers_cas_through_the_server(agent: DevAgent, group_server: Nexus) -> None:
    """The real server, group commit on: 8 writers x 200 CAS writes, each on its own mTLS
    channel; every acknowledged write is stored exactly once, versions dense."""
    material = fetch_svid(agent.socket("pilot"))
    writers, writes = test_concurrency.WRITERS, test_concurrency.WRITES
    start = threading.Barrier(writers)
    conflicts = [0] * writers
    with ThreadPoolExecutor(writers) as pool:
        results = list(pool.map(lambda i: test_concurrency.cas_writes(
            group_server.address, material, i, start, conflicts), range(writers)))
    total = writers * writes
    versions = [v for won in results for v, _ in won]
    assert sorted(versions) == list(range(1, total + 1))
    test_concurrency.assert_all_stored(group_server.address, material,
                                       {v: value for won in results for v, value in won},
                                       total)


def test_a_put_acknowledged_before_kill_9_survives(agent: DevAgent, data_dir: Path) -> None:
    """Writers put concurrently (group commit on); Nexus is killed with SIGKILL while puts
    are still in flight. After a restart and recover, every put acknowledged before the kill
    reads back with its version and data; unacknowledged ones may or may not be there."""
    nexus = start_unsealed(agent, data_dir, ["--group-commit", "on",
                                            "--max-secret-versions", "1000"])
    material = fetch_svid(agent.socket("pilot"))
    writers = 8
    acked: list[list[tuple[str, int, str]]] = [[] for _ in range(writers)]
    ready = threading.Barrier(writers + 1)

    def writer(index: int) -> None:
        channel = client_channel(nexus.address, material, TLS_NAME)
        stub = secrets_pb2_grpc.SecretsStub(channel)
        try:
            ready.wait()
            seq = 0
            while True:
                path, value = f"crash/w{index}/s{seq % 25}", f"w{index}-{seq}"
                try:
                    reply = stub.Put(secrets_pb2.PutSecretRequest(
                        path=path, data={"v": value}), timeout=60)
                except grpc.RpcError:
                    return  # Nexus is gone
                acked[index].append((path, int(reply.version), value))
                seq += 1
        finally:
            channel.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    ready.wait()
    eventually(lambda: sum(len(a) for a in acked) >= 400, "400 acknowledged puts", HOLD)
    before = [list(a) for a in acked]  # acknowledged before the kill (more may follow it)
    nexus.kill()
    for thread in threads:
        thread.join(HOLD)
    assert all(len(a) > 0 for a in before)

    restarted = Nexus(data_dir, agent.env("nexus"))
    try:
        result = pilot(["recover", "--password-stdin"], agent.env("pilot"), restarted,
                       stdin=TEST_PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
        channel = client_channel(restarted.address, material, TLS_NAME)
        try:
            stub = secrets_pb2_grpc.SecretsStub(channel)
            for per in acked:  # all that were acknowledged, even just after the kill
                for path, version, value in per:
                    got = stub.Get(secrets_pb2.GetSecretRequest(path=path, version=version),
                                   timeout=30)
                    assert dict(got.data) == {"v": value}, (path, version)
        finally:
            channel.close()
    finally:
        restarted.stop()
