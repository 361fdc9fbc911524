"""The keyring of record's wraps: a generation opens only under its parent, as itself."""

from __future__ import annotations

import pytest

from nexus.crypto.keyring import KeyringEntry
from nexus.crypto.keys import fingerprint
from nexus.crypto.secret_buffer import SecretKey
from nexus.crypto.wrap import WRAP_SIZE, UnwrapError, unwrap_generation, wrap_generation


def _entry(generation: int) -> KeyringEntry:
    return KeyringEntry.create(generation, SecretKey.generate())


def test_round_trip_into_protected_memory() -> None:
    parent, child = _entry(3), SecretKey.generate()
    blob = wrap_generation(parent, 4, child)
    assert len(blob) == WRAP_SIZE
    assert child.bytes_for_call() not in blob
    key = unwrap_generation(parent, 4, fingerprint(child), blob)
    assert key.bytes_for_call() == child.bytes_for_call()
    assert key.buffer.size == 32
    # A fresh nonce each time: two wraps of one key differ.
    assert wrap_generation(parent, 4, child) != blob


def test_refused_under_another_parent_number_or_fingerprint() -> None:
    parent, child = _entry(3), SecretKey.generate()
    fp = fingerprint(child)
    blob = wrap_generation(parent, 4, child)
    with pytest.raises(UnwrapError, match="does not open"):
        unwrap_generation(_entry(3), 4, fp, blob)          # another key as generation 3
    with pytest.raises(UnwrapError, match="does not open"):
        unwrap_generation(parent, 5, fp, blob)             # replayed as generation 5
    other = KeyringEntry.create(2, SecretKey.from_bytes_consuming(
        bytearray(parent.key.bytes_for_call())))
    with pytest.raises(UnwrapError, match="does not open"):
        unwrap_generation(other, 4, fp, blob)              # the same key, another number
    with pytest.raises(UnwrapError, match="does not open"):
        unwrap_generation(parent, 4, fingerprint(SecretKey.generate()), blob)


def test_every_flipped_byte_is_refused() -> None:
    parent, child = _entry(1), SecretKey.generate()
    fp = fingerprint(child)
    blob = wrap_generation(parent, 2, child)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(UnwrapError):
            unwrap_generation(parent, 2, fp, bytes(bad))
    for cut in (b"", blob[:-1], blob + b"\0"):
        with pytest.raises(UnwrapError, match="format"):
            unwrap_generation(parent, 2, fp, cut)


def test_only_forward() -> None:
    parent = _entry(5)
    with pytest.raises(ValueError, match="older"):
        wrap_generation(parent, 5, SecretKey.generate())


def test_errors_carry_no_key_material() -> None:
    parent, child = _entry(1), SecretKey.generate()
    blob = wrap_generation(parent, 2, child)
    with pytest.raises(UnwrapError) as info:
        unwrap_generation(_entry(1), 2, fingerprint(child), blob)
    text = str(info.value)
    assert blob.hex() not in text and child.bytes_for_call().hex() not in text
