"""The immutable keyring value."""

from __future__ import annotations

import pickle
import struct

import pytest

from nexus.crypto.envelope import DecryptionError, record_identity
from nexus.crypto.keyring import Keyring, UnknownGeneration
from nexus.crypto.keys import Purpose, fingerprint
from nexus.crypto.secret_buffer import SecretKey

ID = record_identity("secret", "a/b", 1)


def test_empty_keyring() -> None:
    ring = Keyring.empty()
    assert ring.active_generation is None
    assert ring.generations == ()
    with pytest.raises(ValueError):
        ring.encrypt(Purpose.SECRETS, b"x", ID)


def test_with_key_is_a_new_value() -> None:
    k1, k2 = SecretKey.generate(), SecretKey.generate()
    r1 = Keyring.empty().with_key(1, k1)
    r2 = r1.with_key(2, k2)
    assert r1.generations == (1,)
    assert r1.active_generation == 1
    assert r2.generations == (1, 2)
    assert r2.active_generation == 2
    assert r2.key_for(1) is k1
    assert r2.fingerprint_for(2) == fingerprint(k2)
    assert r2.fingerprints() == {1: fingerprint(k1), 2: fingerprint(k2)}
    with pytest.raises(ValueError):
        r2.with_key(2, SecretKey.generate())
    inactive = r1.with_key(3, SecretKey.generate(), activate=False)
    assert inactive.active_generation == 1


def test_encrypt_uses_active_decrypt_uses_header() -> None:
    ring = Keyring.empty().with_key(1, SecretKey.generate())
    old = ring.encrypt(Purpose.SECRETS, b"old", ID)
    ring = ring.with_key(2, SecretKey.generate())
    new = ring.encrypt(Purpose.SECRETS, b"new", ID)
    assert struct.unpack(">I", old[1:5])[0] == 1
    assert struct.unpack(">I", new[1:5])[0] == 2
    assert ring.decrypt(Purpose.SECRETS, old, ID) == b"old"
    assert ring.decrypt(Purpose.SECRETS, new, ID) == b"new"
    with pytest.raises(DecryptionError):
        ring.decrypt(Purpose.POLICIES, new, ID)


def test_relabelled_generation_fails() -> None:
    ring = Keyring.from_keys({1: SecretKey.generate(), 2: SecretKey.generate()})
    blob = bytearray(ring.with_active(1).encrypt(Purpose.SECRETS, b"v", ID))
    blob[1:5] = struct.pack(">I", 2)
    with pytest.raises(DecryptionError):
        ring.decrypt(Purpose.SECRETS, bytes(blob), ID)


def test_missing_generation_is_decryption_error() -> None:
    ring = Keyring.from_keys({1: SecretKey.generate(), 2: SecretKey.generate()})
    blob = ring.with_active(1).encrypt(Purpose.SECRETS, b"v", ID)
    smaller = ring.without(1)
    with pytest.raises(DecryptionError):
        smaller.decrypt(Purpose.SECRETS, blob, ID)
    # the original value is untouched
    assert ring.decrypt(Purpose.SECRETS, blob, ID) == b"v"


def test_without_refuses_active_and_unknown() -> None:
    ring = Keyring.from_keys({1: SecretKey.generate(), 2: SecretKey.generate()})
    assert ring.active_generation == 2
    with pytest.raises(ValueError, match="active"):
        ring.without(2)
    with pytest.raises(UnknownGeneration):
        ring.without(9)
    with pytest.raises(KeyError):
        ring.key_for(9)


def test_rollback_with_active() -> None:
    ring = Keyring.from_keys({1: SecretKey.generate(), 2: SecretKey.generate()})
    rolled = ring.with_active(1).without(2)
    assert rolled.generations == (1,)
    assert rolled.active_generation == 1


def test_fingerprint_purpose_cannot_encrypt() -> None:
    ring = Keyring.from_keys({1: SecretKey.generate()})
    with pytest.raises(ValueError):
        ring.encrypt(Purpose.FINGERPRINT, b"x", ID)


def test_wipe_and_repr() -> None:
    key = SecretKey.generate()
    raw = key.bytes_for_call()
    ring = Keyring.from_keys({1: key})
    text = repr(ring) + repr(ring.entry(1))
    assert raw.hex() not in text
    assert fingerprint(key).hex() in text
    with pytest.raises(TypeError):
        pickle.dumps(ring)
    with pytest.raises(TypeError):
        pickle.dumps(ring.entry(1))
    ring.wipe()
    assert key.wiped
    with pytest.raises(ValueError):
        ring.encrypt(Purpose.SECRETS, b"x", ID)


def test_all_locked_reflects_keys() -> None:
    ring = Keyring.from_keys({1: SecretKey.generate()})
    assert ring.all_locked == ring.key_for(1).locked
