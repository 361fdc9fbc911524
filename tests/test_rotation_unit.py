"""The rotation engine in-process, over a real SQLite store and a real key manager.

Covers what is hard to time with processes: a user write landing between a batch's scan and
its conditional update, abort/rollback, a record that fails its integrity check, and the
progress stream's ordering, on ``World`` (tests/harness.py).
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from nexus.api.errors import status_for
from nexus.core import rotation, testpoints
from nexus.core.errors import Conflict, NotFound, NotReady, Unavailable
from nexus.core.policies import Policy
from nexus.core.rotation import STATE_KEY, RotationState
from nexus.core.testpoints import Point
from nexus.store.base import BlobUpdate
from spike.errors import ErrorKind
from spike.states import RotationPhase
from tests.harness import HOLD, PY, SUPERUSER, TEST_PASSWORD, World, tamper


@pytest.fixture()
def world(tmp: Path) -> Iterator[World]:
    w = World(tmp)
    yield w
    w.close()


def stored_state(world: World) -> RotationState:
    """The rotation state in the store itself (not what the engine holds in memory)."""
    raw = world.store._inner.get_state(STATE_KEY)
    assert raw is not None
    return RotationState.from_json(raw)


# ---------------------------------------------------------------- tests


def test_rotation_completes_and_drops_the_old_generation(world: World) -> None:
    expected = world.fill()
    started = world.engine.start(caller="test", batch_size=7)
    assert started.from_generation == 1
    state = world.wait()
    assert state.phase == RotationPhase.COMPLETED, state.message
    assert (state.to_generation, state.done, state.reencrypted, state.failed) == (2, 80, 80, 0)
    world.read_all(expected)
    assert world.generations() == {"rows": {2}, "memory": {2}, "backup": {2}, "file": {2}}
    audit = (world.dir / "audit.jsonl").read_text()
    for action in ("rotation.start", "rotation.new_key", "rotation.completed"):
        assert f'"{action}"' in audit


def test_a_user_write_racing_a_batch_is_not_clobbered(world: World) -> None:
    """Between a batch's read and its conditional update, the user rewrites a policy and
    destroys a secret version that the batch re-encrypted: both user writes win."""
    expected = world.fill(paths=20, versions=1)
    world.policies.put(Policy("team", "^spiffe://spike.internal/team/", "^team/",
                              frozenset({"read"})))
    raced: list[BlobUpdate] = []

    def race(updates: Sequence[BlobUpdate]) -> None:
        raced.extend(updates)
        kinds = {u.key.kind for u in updates}
        assert kinds == {"policy", "secret"}, kinds  # the first batch holds both
        world.policies.put(Policy("team", "^spiffe://spike.internal/team/", "^team/v2/",
                                  frozenset({"read", "list"})))
        victim = next(u.key for u in updates if u.key.kind == "secret")
        world.secrets.destroy(SUPERUSER, victim.path, [victim.version])
        expected.pop((victim.path, victim.version))

    world.store.before_replace = race
    world.engine.start(caller="test", batch_size=8)
    state = world.wait()
    assert raced, "the race hook never ran"
    assert state.phase == RotationPhase.COMPLETED, state.message
    assert (state.done, state.skipped, state.reencrypted) == (21, 2, 19)  # 20 secrets + 1 policy
    policy = world.policies.get("team")
    assert policy.path_pattern == "^team/v2/" and policy.permissions == {"read", "list"}
    victim = next(u.key for u in raced if u.key.kind == "secret")
    row = world.store.get_secret(victim.path, victim.version)
    assert row.destroyed and row.blob is None  # not resurrected by the batch
    world.read_all(expected)
    assert world.generations()["rows"] == {2}


def test_abort_rolls_every_record_back_and_drops_the_new_generation(
        tmp: Path) -> None:
    holder: list[World] = []
    aborted = threading.Event()

    def between() -> None:  # in the worker, between two batches
        if not aborted.is_set():
            aborted.set()
            holder[0].engine.abort("test", reason="unit test")

    world = World(tmp, between=between)
    holder.append(world)
    try:
        expected = world.fill()
        world.engine.start(caller="test", batch_size=10, max_rate=1000)
        state = world.wait()
        assert aborted.is_set()
        assert state.phase == RotationPhase.ABORTED, state.message
        assert world.keys.keyring.active_generation == 1
        assert world.generations() == {"rows": {1}, "memory": {1}, "backup": {1}, "file": {1}}
        world.read_all(expected)
        phases = [s.phase for s in world.engine.watch()]  # terminal snapshot only
        assert phases == [RotationPhase.ABORTED]
        with pytest.raises(NotFound):
            world.engine.abort("test")
        # A new rotation may start after an abort and complete.
        world.engine.start(caller="test", emergency=True)
        again = world.wait()
        assert again.phase == RotationPhase.COMPLETED
        # Note: the number of the dropped generation is handed out again (2), with a new key.
        assert again.to_generation > 1
        assert world.generations() == {k: {again.to_generation}
                                       for k in ("rows", "memory", "backup", "file")}
        world.read_all(expected)
    finally:
        world.close()


def test_tampered_record_fails_safely_then_resume_completes(world: World) -> None:
    expected = world.fill(paths=30, versions=1)
    tamper(world.dir, "app/s007", 1)
    expected.pop(("app/s007", 1))
    world.engine.start(caller="test", batch_size=8)
    state = world.wait()
    assert state.phase == RotationPhase.FAILED, state.message
    assert state.failed == 1 and "integrity" in state.message
    # Both keys kept, in memory and in the backup: nothing became unreadable.
    gens = world.generations()
    assert gens["memory"] == gens["backup"] == gens["file"] == {1, 2}
    assert gens["rows"] == {1, 2}
    world.read_all(expected)
    # A failed rotation blocks new ones until the operator decides.
    with pytest.raises(Conflict):
        world.engine.start(caller="test")
    world.secrets.destroy(SUPERUSER, "app/s007", [1])
    world.engine.resume("test")
    state = world.wait()
    assert state.phase == RotationPhase.COMPLETED, state.message
    assert world.generations() == {"rows": {2}, "memory": {2}, "backup": {2}, "file": {2}}
    world.read_all(expected)


def test_failed_rotation_can_be_aborted(world: World) -> None:
    expected = world.fill(paths=30, versions=1)
    tamper(world.dir, "app/s010", 1)
    expected.pop(("app/s010", 1))
    world.engine.start(caller="test", batch_size=8)
    assert world.wait().phase == RotationPhase.FAILED
    world.engine.abort("test")
    state = world.wait()
    assert state.phase == RotationPhase.ABORTED, state.message
    gens = world.generations()
    assert gens == {"rows": {1}, "memory": {1}, "backup": {1}, "file": {1}}
    world.read_all(expected)


def test_resume_after_unseal_continues_an_interrupted_rotation(tmp: Path) -> None:
    """A checkpoint (graceful shutdown mid-rotation) is resumed when Nexus unseals again."""
    gate = threading.Event()
    stopped = threading.Event()

    def between() -> None:  # in the worker, between two batches
        stopped.set()
        gate.wait(HOLD)  # until the test lets it go: no timing assumption

    world = World(tmp, between=between)
    expected = world.fill()
    world.engine.start(caller="test", batch_size=10, max_rate=1000)
    assert stopped.wait(HOLD)
    world.engine.request_shutdown()  # what shutdown() does, without waiting
    gate.set()
    world.close()
    saved = world.engine.current
    assert saved is not None and saved.phase not in (
        RotationPhase.COMPLETED, RotationPhase.ABORTED, RotationPhase.FAILED)
    again = World(tmp, init=False)
    try:
        again.keys.recover(TEST_PASSWORD.encode())
        state = again.wait()
        assert state.phase == RotationPhase.COMPLETED and state.rotation_id == saved.rotation_id
        again.read_all(expected)
        assert again.generations()["rows"] == {2}
    finally:
        again.close()


def test_abort_request_survives_a_checkpoint(tmp: Path) -> None:
    """An abort asked for while the worker is busy is persisted: after a restart the
    rotation rolls back instead of completing (bug found by the kill -9 abort tests)."""
    gate = threading.Event()
    stopped = threading.Event()

    def between() -> None:  # in the worker, between two batches
        stopped.set()
        gate.wait(HOLD)  # until the test lets it go: no timing assumption

    world = World(tmp, between=between)
    expected = world.fill()
    world.engine.start(caller="test", batch_size=10, max_rate=1000)
    assert stopped.wait(HOLD)
    world.engine.abort("test")
    assert world.engine.current is not None and world.engine.current.abort_requested
    world.engine.request_shutdown()
    gate.set()
    world.close()
    again = World(tmp, init=False)
    try:
        again.keys.recover(TEST_PASSWORD.encode())
        seen = [s.phase for s in again.engine.watch(timeout=0.2)]
        assert again.wait().phase == RotationPhase.ABORTED
        assert RotationPhase.COMPLETED not in seen and (RotationPhase.ROLLBACK in seen
                                                        or seen == [RotationPhase.ABORTED])
        again.read_all(expected)
        assert again.generations()["rows"] == {1}
    finally:
        again.close()


def test_progress_stream_is_ordered_and_ends_once(world: World) -> None:
    world.fill(paths=50, versions=1)
    world.engine.start(caller="test", batch_size=5)
    # watch() repeats the last state as a keep-alive when nothing changed for 0.2 s (a
    # slow batch on a loaded machine): identical repeats, dropped here as Pilot does.
    received = list(world.engine.watch(timeout=0.2))
    events = [e for i, e in enumerate(received) if i == 0 or e.sequence != received[i - 1].sequence]
    for a, b in itertools.pairwise(received):
        assert b.sequence > a.sequence or b == a, (a, b)
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))
    assert [e.terminal for e in events].count(True) == 1 and events[-1].terminal
    for a, b in itertools.pairwise(events):
        if a.phase == b.phase:
            assert b.done >= a.done


def fail_right_after_new_key(world: World) -> None:
    """The store fails once just after the new key went into memory and the backup, before
    the rotation recorded its number: the rotation ends FAILED with to_generation 0."""
    add = world.keys.add_generation

    def add_then_fail() -> Any:
        info = add()
        world.store.fail_count = True
        return info

    world.keys.add_generation = add_then_fail  # type: ignore[method-assign]


@pytest.mark.parametrize("operator", ["resume", "abort"])
def test_failure_right_after_the_new_key_resume_or_abort(world: World, operator: str) -> None:
    """Bug found while testing the runbook: `resume` went to re-encrypt under generation 0
    (UnknownGeneration, FAILED again) and `abort` said "generation 1 active" while the new
    key stayed active in memory and in the backup."""
    expected = world.fill(paths=20, versions=1)
    fail_right_after_new_key(world)
    world.engine.start(caller="test", batch_size=8)
    state = world.wait()
    assert state.phase == RotationPhase.FAILED and state.to_generation == 0, state
    assert world.keys.keyring.active_generation == 2  # new writes already use it
    world.secrets.put(SUPERUSER, "app/late", {"k": "written under 2"}, None)
    expected[("app/late", 1)] = {"k": "written under 2"}
    if operator == "resume":
        world.engine.resume("test")
        state = world.wait()
        assert state.phase == RotationPhase.COMPLETED, state.message
        assert state.to_generation == 2
        want = 2
    else:
        world.engine.abort("test")
        state = world.wait()
        assert state.phase == RotationPhase.ABORTED, state.message
        want = 1
    assert world.keys.keyring.active_generation == want
    assert world.generations() == {k: {want} for k in ("rows", "memory", "backup", "file")}
    world.read_all(expected)


def test_generation_numbers_are_never_reused_after_an_abort(tmp: Path) -> None:
    """An aborted rotation's number stays burnt: an old export holding it can never pass
    for a later key with the same number. The abort is requested from the worker's own
    pause after its first batch, so it always lands mid-rotation (requested from outside
    right after the start, it raced the worker: NotFound or Conflict on a fast finish)."""
    holder: list[World] = []
    requested = threading.Event()

    def between() -> None:  # in the worker, between two batches
        if not requested.is_set():
            requested.set()
            holder[0].engine.abort("t")

    world = World(tmp, between=between)
    holder.append(world)
    try:
        world.fill(paths=20, versions=1)
        assert world.keys.next_generation() == 2
        world.engine.start(caller="t", batch_size=5, max_rate=1000)
        state = world.wait()
        assert requested.is_set() and state.phase == RotationPhase.ABORTED, state
        assert world.keys.keyring.generations == (1,)
        assert world.keys.next_generation() == 3
        world.engine.start(caller="t", emergency=True)
        last = world.wait()
        assert last.phase == RotationPhase.COMPLETED and last.to_generation == 3
    finally:
        world.close()


def test_validation_uses_the_new_key_not_whatever_the_header_names(world: World) -> None:
    """A row whose generation column already says the new generation while its ciphertext is
    still under the old key is skipped by re-encryption (it looks done). Validation must
    catch it — decrypting by the header's generation would pass, and finalize would then
    drop the only key that opens it. (The engine sets such cells right before it
    re-encrypts, nexus.core.integrity, so the cell is edited while the first batch is
    being written, for a row further on.)"""
    expected = world.fill(paths=20, versions=1)
    inner: Any = world.store._inner
    row = inner.get_secret("app/s015", 1)

    def edit_cell(_updates: Sequence[BlobUpdate]) -> None:
        assert inner.replace_blobs([BlobUpdate("secret", "app/s015", 1, 1, row.blob, 2,
                                               row.blob)]) == 1

    world.store.before_replace = edit_cell
    world.engine.start(caller="test", emergency=True, batch_size=5)
    state = world.wait()
    assert state.phase == RotationPhase.FAILED, state.message
    assert "does not decrypt under generation 2" in state.message
    gens = world.generations()
    assert gens["memory"] == gens["backup"] == gens["file"] == {1, 2}  # nothing dropped
    world.read_all(expected)


def test_a_cell_edited_before_the_rotation_is_set_right_and_it_completes(world: World) -> None:
    """The same edit made before the rotation starts: re-encryption first sets the cell to
    the generation its header names, so the rotation completes and nothing is lost."""
    expected = world.fill(paths=20, versions=1)
    db = sqlite3.connect(world.dir / "spike.db")
    try:
        db.execute("UPDATE records SET generation = 2 WHERE kind = 'secret' AND path = ?",
                   ("app/s005",))
        db.commit()
    finally:
        db.close()
    world.engine.start(caller="test", emergency=True)
    state = world.wait()
    assert state.phase == RotationPhase.COMPLETED, state.message
    world.read_all(expected)


def test_a_full_disk_fails_the_rotation_visibly_and_resume_continues(tmp: Path) -> None:
    """The store refuses every write after the first batch, the FAILED phase too: the
    worker must still end the rotation FAILED (in memory, for watchers), save that once the
    store takes writes again, and resume from the saved cursor (it used to die, leaving
    ``reencrypt`` with no worker)."""
    holder: list[World] = []
    filled = threading.Event()

    def between() -> None:  # in the worker, between two batches
        if not filled.is_set():
            filled.set()
            holder[0].store.writes_fail = True

    world = World(tmp, between=between)
    holder.append(world)
    try:
        expected = world.fill(paths=30, versions=1)
        world.engine.start(caller="test", batch_size=10, max_rate=1000)
        state = world.wait()
        assert state.phase == RotationPhase.FAILED and state.terminal, state
        assert (state.failure_kind, state.failed_in_phase) == ("store", RotationPhase.REENCRYPT), \
            state
        assert state.failure_unsaved and "disk is full" in state.message, state
        stored = stored_state(world)
        assert stored.phase == RotationPhase.REENCRYPT and stored.done == 10
        assert not world.engine.running() and not world.engine.orphaned()
        current = world.engine.current
        # not the stored phase
        assert current is not None and current.phase == RotationPhase.FAILED
        with pytest.raises(Conflict):
            world.engine.start(caller="test")
        with pytest.raises(Unavailable):
            world.engine.resume("test")
        world.read_all(expected)  # both keys kept: everything reads

        world.store.writes_fail = False
        deadline = time.monotonic() + HOLD
        while stored_state(world).phase != RotationPhase.FAILED:
            assert time.monotonic() < deadline, "the failure was never saved"
            time.sleep(0.02)
        saved = stored_state(world)
        assert not saved.failure_unsaved and saved.cursor == stored.cursor
        resumed = world.engine.resume("test")
        assert resumed.cursor == stored.cursor  # continues from the saved progress
        state = world.wait()
        assert state.phase == RotationPhase.COMPLETED, state.message
        assert world.generations() == {"rows": {2}, "memory": {2}, "backup": {2}, "file": {2}}
        world.read_all(expected)
    finally:
        world.store.writes_fail = False
        world.close()


@pytest.mark.parametrize("held_in", ["listener", "commit"])
def test_watch_and_abort_never_wait_on_a_listener_or_a_commit(tmp: Path, held_in: str) -> None:
    """The worker is held inside a listener (or right before a batch's store write) with the
    publication order taken: a watcher still gets its snapshot and an abort returns at once;
    the abort request is saved by the worker as soon as it lets go, and the rotation rolls
    back. (Both used to wait for the lock the worker held through commits and listeners.)"""
    inside, release = threading.Event(), threading.Event()
    published: list[RotationState] = []

    def hold() -> None:
        if not inside.is_set():
            inside.set()
            release.wait()

    world = World(tmp)
    if held_in == "listener":
        world.engine.add_listener(lambda s: hold() if s.phase == RotationPhase.REENCRYPT
                                  and s.done else None)
    else:
        world.store.before_replace = lambda _updates: hold()
    world.engine.add_listener(published.append)
    try:
        world.fill(paths=20, versions=1)
        world.engine.start(caller="test", batch_size=5, max_rate=1000)
        assert inside.wait(HOLD)
        snapshots: list[RotationState] = []

        def outside() -> None:  # a watcher, then an operator's abort
            snapshots.append(next(world.engine.watch()))
            world.engine.abort("test")

        caller = threading.Thread(target=outside)
        caller.start()
        caller.join(HOLD)  # a deadline against a hang, not a timing assumption
        assert not caller.is_alive(), "watch() or abort() waited for the worker"
        assert [s.phase for s in snapshots] == [RotationPhase.REENCRYPT]
        release.set()
        state = world.wait()
        assert state.phase == RotationPhase.ABORTED, state.message
        assert any(s.abort_requested and s.phase == RotationPhase.REENCRYPT for s in published)
        sequences = [s.sequence for s in published]
        assert sequences == sorted(set(sequences))  # in order, no duplicate
    finally:
        release.set()
        world.close()


def test_an_acknowledged_abort_is_durable_while_a_publication_holds_the_state(
        tmp: Path) -> None:
    """abort() answers without waiting for the worker (held inside a listener, so the state
    row cannot carry the request yet), and the request is already on disk: a Nexus that
    stops right then (the worker never saves a state again) rolls back after the restart."""
    inside, release = threading.Event(), threading.Event()

    def hold(state: RotationState) -> None:
        if state.phase == RotationPhase.REENCRYPT and state.done and not inside.is_set():
            inside.set()
            release.wait(HOLD)

    world = World(tmp)
    world.engine.add_listener(hold)
    expected = world.fill(paths=20, versions=1)
    world.engine.start(caller="test", batch_size=5, max_rate=1000)
    assert inside.wait(HOLD)
    rotation_id = next(world.engine.watch()).rotation_id
    done = threading.Event()

    def operator() -> None:
        world.engine.abort("test")
        done.set()

    threading.Thread(target=operator).start()
    assert done.wait(HOLD), "abort() waited for the worker"
    stored = RotationState.from_json(world.store.get_state(STATE_KEY) or "")
    assert not stored.abort_requested  # the state row does not carry it yet ...
    assert world.store.get_state(rotation.ABORT_KEY) == rotation_id  # ... its own row does
    # The process "dies" now: from here on, nothing it does reaches the store.
    world.store.writes_fail = True
    world.engine.request_shutdown()
    release.set()
    world.close()
    again = World(tmp, init=False)
    try:
        again.keys.recover(TEST_PASSWORD.encode())
        state = again.wait()
        assert state.phase == RotationPhase.ABORTED and state.rotation_id == rotation_id
        again.read_all(expected)
        assert again.generations()["rows"] == {1}
    finally:
        again.close()


def _hold_at_finalize_gate(world: World, until: threading.Event,
                           arrived: threading.Event) -> Callable[[Point], None]:
    def hook(point: Point) -> None:
        if point == Point.ROTATION_FINALIZE_GATE and world.engine.in_worker():
            arrived.set()
            until.wait(HOLD)

    testpoints.add_hook(hook)
    return hook


def test_an_abort_accepted_after_validation_rolls_back(tmp: Path) -> None:
    """Validation passed and FINALIZE is not published yet: an abort answered now must win
    (it used to be answered "ok" while the rotation went on to complete)."""
    world = World(tmp)
    go, arrived = threading.Event(), threading.Event()
    hook = _hold_at_finalize_gate(world, go, arrived)
    try:
        expected = world.fill(paths=10, versions=1)
        world.engine.start(caller="test", batch_size=5, max_rate=1000)
        assert arrived.wait(HOLD)
        world.engine.abort("test")
        go.set()
        state = world.wait()
        assert state.phase == RotationPhase.ABORTED, state.message
        world.read_all(expected)
        assert world.generations()["rows"] == {1}
    finally:
        go.set()
        testpoints.remove_hook(hook)
        world.close()


def test_the_worker_does_not_finalize_while_an_abort_is_being_recorded(tmp: Path) -> None:
    """The worker reaches the finalize gate while an abort is still writing its audit line:
    it waits for that abort, then rolls back."""
    world = World(tmp)
    in_abort, release_abort, arrived = threading.Event(), threading.Event(), threading.Event()
    hook = _hold_at_finalize_gate(world, in_abort, arrived)
    record = world.engine._audit.record

    def slow_record(action: str, **kwargs: Any) -> None:
        if action == "rotation.abort":
            in_abort.set()
            assert release_abort.wait(HOLD)
        record(action, **kwargs)

    world.engine._audit.record = slow_record  # type: ignore[method-assign]
    try:
        world.fill(paths=10, versions=1)
        world.engine.start(caller="test", batch_size=5, max_rate=1000)
        assert arrived.wait(HOLD)  # the worker is at the gate ...
        operator = threading.Thread(target=world.engine.abort, args=("test",))
        operator.start()
        assert in_abort.wait(HOLD)  # ... and goes on while the abort is being recorded
        release_abort.set()
        operator.join(HOLD)
        assert world.wait().phase == RotationPhase.ABORTED
    finally:
        in_abort.set()
        release_abort.set()
        testpoints.remove_hook(hook)
        world.close()


def test_low_disk_space_is_a_failed_precondition(world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Less than MIN_FREE_BYTES free in the data directory: the rotation is refused as a
    failed precondition (kind ``store``), no longer as a conflict (ABORTED), and nothing
    changes."""
    world.fill(paths=5, versions=1)
    monkeypatch.setattr(rotation, "MIN_FREE_BYTES", 1 << 62)
    with pytest.raises(NotReady) as refused:
        world.engine.start(caller="test")
    assert refused.value.kind == ErrorKind.STORE
    assert "free in the data directory: rotation refused" in str(refused.value)
    assert status_for(refused.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert world.engine.current is None and not world.engine.running()
    assert world.generations() == {"rows": {1}, "memory": {1}, "backup": {1}, "file": {1}}


def test_a_bad_backup_is_a_failed_precondition(world: World) -> None:
    """The backup file is missing: the rotation is refused as a failed precondition (kind
    ``backup_invalid``), no longer as a conflict (ABORTED)."""
    world.fill(paths=5, versions=1)
    (world.dir / "root-key.backup").unlink()
    with pytest.raises(NotReady) as refused:
        world.engine.start(caller="test")
    assert refused.value.kind == ErrorKind.BACKUP_INVALID
    assert "the backup is missing" in str(refused.value)
    assert status_for(refused.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert world.engine.current is None and world.keys.keyring.generations == (1,)


@pytest.mark.parametrize("variable", ["SPIKE_NEXUS_TEST_GATE_AT", "SPIKE_NEXUS_TEST_PAUSE_AT"])
def test_an_unknown_test_point_fails_at_start_up(variable: str) -> None:
    """A typo in a test point's name stops Nexus at start-up, naming the known points
    (it used to show as a rotation that never stopped where the test waited)."""
    env = {**os.environ, variable: "rotation_betwen_batches"}
    result = subprocess.run([PY, "-m", "nexus", "--help"], env=env, capture_output=True,
                            text=True, timeout=HOLD, check=False)
    assert result.returncode != 0
    assert f"{variable}='rotation_betwen_batches' is not a test point" in result.stderr
    assert Point.ROTATION_BETWEEN_BATCHES.value in result.stderr
    ok = subprocess.run([PY, "-m", "nexus", "--help"], capture_output=True, text=True,
                        timeout=HOLD, check=False,
                        env={**os.environ, variable: Point.ROTATION_BETWEEN_BATCHES.value})
    assert ok.returncode == 0, ok.stderr


def test_a_watcher_that_falls_behind_gets_every_state_in_order(tmp: Path) -> None:
    """A watcher that reads nothing while the rotation runs then gets every state published
    after its snapshot, in order, each once, the terminal one last (not only the newest)."""
    snapped = threading.Event()
    world = World(tmp, between=lambda: snapped.wait(HOLD))
    published: list[RotationState] = []
    world.engine.add_listener(published.append)
    try:
        world.fill(paths=20, versions=1)
        world.engine.start(caller="test", batch_size=5, max_rate=1000)
        stream = world.engine.watch(timeout=HOLD)
        first = next(stream)  # the worker cannot pass its first batch before this
        snapped.set()
        assert not first.terminal
        assert world.wait().phase == RotationPhase.COMPLETED
        rest = list(stream)
        assert rest == [s for s in published if s.sequence > first.sequence]
        assert len(rest) >= 5 and [s.terminal for s in rest] == [False] * (len(rest) - 1) + [True]
    finally:
        snapped.set()
        world.close()
