"""Rotation's validation without a second decryption pass: every new ciphertext is opened
under the new key in memory before it is written (``Resealer.reseal_checked``), and the store
must show no record whose generation cell or header names another generation."""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexus.crypto import envelope
from nexus.crypto.envelope import Resealer, SealCheckFailed, decrypt, encrypt, record_identity
from nexus.crypto.keys import AeadKey, Purpose
from nexus.crypto.secret_buffer import SecretKey
from spike.states import FailureKind, RotationPhase
from tests.harness import World

OLD = AeadKey(SecretKey.from_bytes_consuming(bytearray(b"o" * 32)), Purpose.SECRETS)
NEW = AeadKey(SecretKey.from_bytes_consuming(bytearray(b"n" * 32)), Purpose.SECRETS)
PATH, VERSION = "app/db/password", 3
IDENTITY = record_identity("secret", PATH, VERSION)


def test_reseal_checked_is_reseal_and_its_output_opens_under_the_new_key() -> None:
    r = Resealer("secret", {5: OLD}, NEW, 6)
    blob = encrypt(OLD, 5, b"value", IDENTITY)
    new = r.reseal_checked(PATH, VERSION, blob)
    assert new is not None and envelope.peek_generation(new) == 6
    assert decrypt(NEW, new, IDENTITY, expected_generation=6) == b"value"
    assert r.opens_under_target(PATH, VERSION, new)
    # What reseal refuses, reseal_checked refuses the same way.
    assert r.reseal_checked(PATH, VERSION + 1, blob) is None
    relabelled = blob[:1] + struct.pack(">I", 4) + blob[5:]
    assert r.reseal_checked(PATH, VERSION, relabelled) is None
    assert r.reseal_checked(PATH, VERSION, blob[:envelope.OVERHEAD - 1]) is None


class _BrokenCipher:
    """An AEAD whose ciphertexts do not open (a damaged key in memory, in effect)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def encrypt(self, nonce: bytes, data: bytes, associated: bytes) -> bytes:
        sealed = bytearray(self._real.encrypt(nonce, data, associated))
        sealed[0] ^= 1
        return bytes(sealed)

    def decrypt(self, nonce: bytes, data: bytes, associated: bytes) -> bytes:
        return bytes(self._real.decrypt(nonce, data, associated))


def test_reseal_checked_refuses_a_ciphertext_that_does_not_open() -> None:
    r = Resealer("secret", {5: OLD}, NEW, 6)
    r._seal = _BrokenCipher(r._seal)  # type: ignore[assignment]
    with pytest.raises(SealCheckFailed) as raised:
        r.reseal_checked(PATH, VERSION, encrypt(OLD, 5, b"value", IDENTITY))
    assert "value" not in str(raised.value)


@pytest.fixture()
def world(tmp: Path) -> Iterator[World]:
    running = World(tmp)
    yield running
    running.close()


def test_a_new_ciphertext_that_does_not_open_fails_the_rotation_before_it_is_written(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = world.fill(paths=20, versions=1)
    made = envelope.Resealer.__init__

    def broken(self: Resealer, *args: Any) -> None:
        made(self, *args)
        self._seal = _BrokenCipher(self._seal)  # type: ignore[assignment]

    monkeypatch.setattr(envelope.Resealer, "__init__", broken)
    world.engine.start(caller="test", emergency=True, batch_size=5)
    state = world.wait()
    assert state.phase == RotationPhase.FAILED, state
    assert state.failure_kind == FailureKind.VALIDATION
    assert state.failed_in_phase == RotationPhase.REENCRYPT
    assert "does not decrypt under generation 2" in state.message
    assert world.store.count_by_generation() == {1: 20}  # nothing written with the new key
    gens = world.generations()
    assert gens["memory"] == gens["backup"] == gens["file"] == {1, 2}
    monkeypatch.undo()
    world.read_all(expected)
    world.engine.resume("test")
    assert world.wait().phase == RotationPhase.COMPLETED
    world.read_all(expected)


def test_a_cell_naming_the_new_generation_over_an_old_header_fails_validation(
        world: World) -> None:
    """Set while re-encryption runs (after it reconciled the cells), so re-encryption skips
    the record: validation's scan of cells against headers must catch it."""
    expected = world.fill(paths=12, versions=1)
    seen: list[Any] = []

    def edit(state: Any) -> None:
        if state.phase == RotationPhase.VALIDATE and not seen:
            seen.append(state)
            db = sqlite3.connect(world.dir / "spike.db")
            try:
                rows = db.execute("SELECT path FROM records WHERE kind = 'secret'").fetchall()
                assert rows
                # Put one record back to its old ciphertext under a cell naming the target.
                db.execute("UPDATE records SET blob = ?, generation = 2 WHERE kind = 'secret'"
                           " AND path = 'app/s004' AND version = 1", (old_blob,))
                db.commit()
            finally:
                db.close()

    old_blob = world.store.get_secret("app/s004", 1).blob
    world.engine.add_listener(edit)
    world.engine.start(caller="test", emergency=True, batch_size=5)
    state = world.wait()
    assert seen
    assert state.phase == RotationPhase.FAILED and state.failure_kind == FailureKind.VALIDATION
    assert "app/s004 v1 does not decrypt under generation 2" in state.message
    gens = world.generations()
    assert gens["memory"] == gens["backup"] == gens["file"] == {1, 2}
    world.read_all(expected)


def test_every_resealed_record_gets_its_own_nonce() -> None:
    """Nonces come from a pool drawn NONCE_POOL at a time: across refills none repeats."""
    r = Resealer("secret", {5: OLD}, NEW, 6)
    blob = encrypt(OLD, 5, b"value", IDENTITY)
    count = 3 * envelope.NONCE_POOL + 7
    made = [r.reseal_checked(PATH, VERSION, blob) if i % 2 else r.reseal(PATH, VERSION, blob)
            for i in range(count)]
    nonces = {m[5:envelope.HEADER_SIZE] for m in made if m is not None}
    assert len(nonces) == count
    assert all(decrypt(NEW, m, IDENTITY) == b"value" for m in made if m is not None)
