"""PolicyEngine in process: policy timestamps and the compiled-policy cache."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import cast

import pytest

from nexus.core.counter import EncryptionCounter
from nexus.core.keymanager import KeyManager
from nexus.core.policies import Policy, PolicyEngine
from nexus.crypto.keys import Purpose
from nexus.store import RecordRow, Store, open_store

SU = "spiffe://spike.internal/spike/pilot/role/superuser"
SEALED = b"sealed:"


class FakeKeyring:
    """Stands in for the unsealed keyring: "encryption" is a visible prefix."""

    active_generation = 1

    def encrypt(self, purpose: Purpose, plaintext: bytes, identity: bytes) -> bytes:
        return SEALED + plaintext

    def decrypt(self, purpose: Purpose, blob: bytes, identity: bytes) -> bytes:
        assert blob.startswith(SEALED)
        return blob[len(SEALED):]


class FakeKeys:
    """The two KeyManager calls the engine makes."""

    def __init__(self) -> None:
        self.keyring = FakeKeyring()

    def require_unsealed(self) -> FakeKeyring:
        return self.keyring

    def assert_current(self, keyring: FakeKeyring) -> None:
        assert keyring is self.keyring


def _engine(store: Store, clock: Callable[[], float] = lambda: 0.0) -> PolicyEngine:
    return PolicyEngine(store, cast(KeyManager, FakeKeys()), SU, EncryptionCounter(store),
                        cache_seconds=1e9, clock=clock)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store("sqlite", path=tmp_path / "spike.db")
    yield opened
    opened.close()


# --------------------------------------------------------------------------- timestamps


def test_updated_moves_on_replace_while_created_stays(store: Store) -> None:
    now = [100.0]
    engine = _engine(store, clock=lambda: now[0])
    first = engine.put(Policy("ops", "spiffe://td/ops", "ops/.*", frozenset({"read"})))
    assert (first.created, first.updated) == (100.0, 100.0)
    now[0] = 250.5
    second = engine.put(Policy("ops", "spiffe://td/ops", "ops/.*",
                               frozenset({"read", "write"})))
    assert (second.created, second.updated) == (100.0, 250.5)
    assert second.permissions == frozenset({"read", "write"})
    assert engine.get("ops") == second
    assert engine.list() == [second]


def test_a_document_without_an_update_time_reports_its_creation(store: Store) -> None:
    old = Policy("legacy", "spiffe://td/x", "x/.*", frozenset({"list"}))
    store.put_policy("legacy", 1, SEALED + old.to_json(), 42.0)
    got = _engine(store).get("legacy")
    assert (got.created, got.updated) == (42.0, 42.0)
    assert (got.name, got.permissions) == ("legacy", frozenset({"list"}))


# --------------------------------------------------------------------------- cache


class ListCounter:
    """The one Store call a cache rebuild makes, counted, with a hook inside it."""

    def __init__(self, during: Callable[[], None]) -> None:
        self.during = during
        self.lists = 0

    def list_policies(self) -> list[RecordRow]:
        self.lists += 1
        self.during()
        return []


class ArrivalLock:
    """A lock that tells when ``expected`` threads have come to it."""

    def __init__(self, expected: int) -> None:
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._arrived = 0
        self._expected = expected
        self.all_arrived = threading.Event()

    def __enter__(self) -> None:
        with self._count_lock:
            self._arrived += 1
            if self._arrived == self._expected:
                self.all_arrived.set()
        self._lock.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()


def test_threads_waiting_for_a_rebuild_take_its_result() -> None:
    waiters = 6
    lock = ArrivalLock(waiters)
    # The first rebuild holds the lock until every thread is queued behind it.
    store = ListCounter(lambda: None if lock.all_arrived.wait(30) else pytest.fail("stuck"))
    engine = _engine(cast(Store, store))
    engine._lock = lock  # type: ignore[assignment]
    verdicts: list[bool] = []
    threads = [threading.Thread(target=lambda: verdicts.append(
        engine.allowed("spiffe://td/app", "apps/db", "read"))) for _ in range(waiters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert verdicts == [False] * waiters
    assert store.lists == 1


def test_a_change_during_a_rebuild_is_not_kept() -> None:
    changes: list[int] = []
    engine: PolicyEngine | None = None

    def a_policy_changes() -> None:
        if not changes:  # a put or delete commits while the first list is read
            changes.append(1)
            assert engine is not None
            engine.invalidate()

    store = ListCounter(a_policy_changes)
    engine = _engine(cast(Store, store))
    assert not engine.allowed("spiffe://td/app", "apps/db", "read")
    assert store.lists == 1
    assert not engine.allowed("spiffe://td/app", "apps/db", "read")
    assert store.lists == 2  # that list may have missed the change: read again
    assert not engine.allowed("spiffe://td/app", "apps/db", "read")
    assert store.lists == 2  # this one was complete: cached
