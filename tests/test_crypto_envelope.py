"""Record envelope: round trip, tamper, move, relabel and malformed-input tests."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.crypto.envelope import (
    ENVELOPE_VERSION,
    HEADER_SIZE,
    OVERHEAD,
    DecryptionError,
    _encrypt_with_nonce,
    decrypt,
    encrypt,
    peek_generation,
    record_identity,
)
from nexus.crypto.keys import AeadKey, Purpose
from nexus.crypto.secret_buffer import SecretKey

ROOT = SecretKey.from_bytes_consuming(bytearray(range(32)))
KEY = AeadKey(ROOT, Purpose.SECRETS)
IDENTITY = record_identity("secret", "app/db/password", 3)


def test_round_trip_and_layout() -> None:
    blob = encrypt(KEY, 7, b"hunter2", IDENTITY)
    assert blob[0] == ENVELOPE_VERSION
    assert struct.unpack(">I", blob[1:5])[0] == 7
    assert len(blob) == OVERHEAD + len(b"hunter2")
    assert peek_generation(blob) == 7
    assert decrypt(KEY, blob, IDENTITY) == b"hunter2"
    assert decrypt(KEY, blob, IDENTITY, expected_generation=7) == b"hunter2"


def test_nonces_are_fresh() -> None:
    a = encrypt(KEY, 1, b"same", IDENTITY)
    b = encrypt(KEY, 1, b"same", IDENTITY)
    assert a[5:HEADER_SIZE] != b[5:HEADER_SIZE]
    assert a != b


def test_fixed_nonce_is_deterministic() -> None:
    nonce = b"\x00" * 12
    a = _encrypt_with_nonce(KEY, 1, b"x", IDENTITY, nonce)
    assert a == _encrypt_with_nonce(KEY, 1, b"x", IDENTITY, nonce)


def test_every_single_byte_flip_fails() -> None:
    blob = encrypt(KEY, 2, b"a secret value", IDENTITY)
    for i in range(len(blob)):
        for mask in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[i] ^= mask
            with pytest.raises(DecryptionError):
                decrypt(KEY, bytes(tampered), IDENTITY)


@pytest.mark.parametrize(
    "other",
    [
        record_identity("secret", "app/db/passwort", 3),
        record_identity("secret", "app/db/password", 4),
        record_identity("policy", "app/db/password", 3),
        record_identity("secret", "", 3),
        b"",
    ],
)
def test_moved_record_fails(other: bytes) -> None:
    blob = encrypt(KEY, 1, b"v", IDENTITY)
    with pytest.raises(DecryptionError):
        decrypt(KEY, blob, other)


def test_identity_is_unambiguous() -> None:
    assert record_identity("ab", "c", 1) != record_identity("a", "bc", 1)
    assert record_identity("a", "b/c", 1) != record_identity("a/b", "c", 1)
    with pytest.raises(ValueError):
        record_identity("", "p", 1)
    with pytest.raises(ValueError):
        record_identity("k", "p", -1)


def test_header_relabelled_to_other_generation_fails() -> None:
    blob = bytearray(encrypt(KEY, 1, b"v", IDENTITY))
    blob[1:5] = struct.pack(">I", 2)
    with pytest.raises(DecryptionError):
        decrypt(KEY, bytes(blob), IDENTITY)
    original = encrypt(KEY, 1, b"v", IDENTITY)
    with pytest.raises(DecryptionError):
        decrypt(KEY, original, IDENTITY, expected_generation=2)


def test_wrong_key_and_wrong_purpose_fail() -> None:
    blob = encrypt(KEY, 1, b"v", IDENTITY)
    with pytest.raises(DecryptionError):
        decrypt(AeadKey(SecretKey.generate(), Purpose.SECRETS), blob, IDENTITY)
    with pytest.raises(DecryptionError):
        decrypt(AeadKey(ROOT, Purpose.POLICIES), blob, IDENTITY)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01",
        b"\x01" + b"\x00" * (OVERHEAD - 2),
        b"\x02" + b"\x00\x00\x00\x01" + b"\x00" * 40,
        b"\x01" + b"\x00\x00\x00\x00" + b"\x00" * 40,
    ],
)
def test_malformed_blobs_raise_the_one_error(blob: bytes) -> None:
    with pytest.raises(DecryptionError) as info:
        decrypt(KEY, blob, IDENTITY)
    assert str(info.value) == "record could not be decrypted"


def test_misuse_is_value_error() -> None:
    for generation in (0, -1, 2**32, True):
        with pytest.raises(ValueError):
            encrypt(KEY, generation, b"x", IDENTITY)
    with pytest.raises(ValueError):
        encrypt(KEY, 1, b"x", "not bytes")  # type: ignore[arg-type]


def test_error_message_never_contains_data() -> None:
    secret = b"TOPSECRETVALUE"
    blob = bytearray(encrypt(KEY, 1, secret, IDENTITY))
    blob[-1] ^= 1
    with pytest.raises(DecryptionError) as info:
        decrypt(KEY, bytes(blob), IDENTITY)
    text = str(info.value) + repr(info.value)
    assert "TOPSECRET" not in text
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@settings(max_examples=200, deadline=None)
@given(
    plaintext=st.binary(max_size=2048),
    generation=st.integers(min_value=1, max_value=2**32 - 1),
    kind=st.text(min_size=1, max_size=20),
    path=st.text(max_size=100),
    version=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_round_trip_property(
    plaintext: bytes, generation: int, kind: str, path: str, version: int
) -> None:
    identity = record_identity(kind, path, version)
    blob = encrypt(KEY, generation, plaintext, identity)
    assert peek_generation(blob) == generation
    assert decrypt(KEY, blob, identity) == plaintext
