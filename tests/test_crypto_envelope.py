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
    Resealer,
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


# --------------------------------------------------------------------------- Resealer

OLD = AeadKey(SecretKey.from_bytes_consuming(bytearray(b"o" * 32)), Purpose.SECRETS)
OLDER = AeadKey(SecretKey.from_bytes_consuming(bytearray(b"p" * 32)), Purpose.SECRETS)
NEW = AeadKey(SecretKey.from_bytes_consuming(bytearray(b"n" * 32)), Purpose.SECRETS)
PATH, VERSION = "app/db/password", 3


def resealer() -> Resealer:
    return Resealer("secret", {4: OLDER, 5: OLD, 6: NEW}, NEW, 6)


@settings(max_examples=60, deadline=None)
@given(plain=st.binary(max_size=2048), source=st.sampled_from([4, 5]),
       path=st.text(min_size=1, max_size=40), version=st.integers(0, 2**64 - 1))
def test_reseal_is_decrypt_then_encrypt(plain: bytes, source: int, path: str,
                                        version: int) -> None:
    identity = record_identity("secret", path, version)
    blob = encrypt({4: OLDER, 5: OLD}[source], source, plain, identity)
    new = resealer().reseal(path, version, blob)
    assert new is not None and new != blob
    assert peek_generation(new) == 6
    assert decrypt(NEW, new, identity, expected_generation=6) == plain
    assert resealer().opens_under_target(path, version, new)
    assert not resealer().opens_under_target(path, version, blob)


def test_reseal_refuses_what_decrypt_refuses() -> None:
    good = encrypt(OLD, 5, b"value", IDENTITY)
    r = resealer()
    assert r.reseal(PATH, VERSION, good) is not None
    assert r.reseal(PATH, VERSION + 1, good) is None  # moved to another version
    assert r.reseal("app/db/other", VERSION, good) is None  # moved to another path
    assert Resealer("policy", {5: OLD}, NEW, 6).reseal(PATH, VERSION, good) is None
    relabelled = good[:1] + struct.pack(">I", 4) + good[5:]  # header names another key
    assert r.reseal(PATH, VERSION, relabelled) is None
    unknown = encrypt(OLD, 9, b"value", IDENTITY)  # a generation it has no key for
    assert r.reseal(PATH, VERSION, unknown) is None
    assert r.reseal(PATH, VERSION, b"\x01" + good[1:OVERHEAD - 1]) is None  # too short
    assert r.reseal(PATH, VERSION, b"\x02" + good[1:]) is None  # unknown format
    for i in range(len(good)):
        flipped = bytearray(good)
        flipped[i] ^= 0x01
        assert r.reseal(PATH, VERSION, bytes(flipped)) is None, i
    a, b = r.reseal(PATH, VERSION, good), r.reseal(PATH, VERSION, good)
    assert a is not None and b is not None and a[5:HEADER_SIZE] != b[5:HEADER_SIZE]


def test_opens_under_target_needs_the_new_key_and_a_header_naming_it() -> None:
    r = resealer()
    under_new = encrypt(NEW, 6, b"value", IDENTITY)
    assert r.opens_under_target(PATH, VERSION, under_new)
    assert not r.opens_under_target(PATH, VERSION + 1, under_new)
    # Sealed with the old key, header rewritten to name the new generation: fails the tag.
    old = encrypt(OLD, 5, b"value", IDENTITY)
    assert not r.opens_under_target(PATH, VERSION, old[:1] + struct.pack(">I", 6) + old[5:])
    # Sealed with the new key but the header names another generation: refused as well.
    mislabelled = encrypt(NEW, 5, b"value", IDENTITY)
    assert not r.opens_under_target(PATH, VERSION, mislabelled)
    assert not r.opens_under_target(PATH, VERSION, under_new[:OVERHEAD - 1])
    with pytest.raises(ValueError):
        Resealer("secret", {}, NEW, 0)
    with pytest.raises(ValueError):
        Resealer("", {}, NEW, 6)
