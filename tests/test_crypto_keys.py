"""Sub-key derivation and fingerprints, checked against an independent stdlib computation."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from nexus.crypto.keys import (
    FINGERPRINT_MESSAGE,
    AeadKey,
    Purpose,
    derive_subkey,
    fingerprint,
    fingerprint_hex,
    fingerprints_equal,
)
from nexus.crypto.secret_buffer import SecretKey


def _hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 written out with hmac/hashlib only (salt absent = HashLen zero bytes)."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _key(raw: bytes) -> SecretKey:
    return SecretKey.from_bytes_consuming(bytearray(raw))


ROOT = bytes(range(32))


def test_labels_are_distinct_and_versioned() -> None:
    labels = [p.label for p in Purpose]
    assert len(set(labels)) == len(labels)
    assert Purpose.SECRETS.label == b"spike/v1/secrets"
    assert Purpose.POLICIES.label == b"spike/v1/policies"
    assert Purpose.FINGERPRINT.label == b"spike/v1/fingerprint"
    assert all(label.startswith(b"spike/v1/") for label in labels)


@pytest.mark.parametrize("purpose", list(Purpose))
def test_subkey_matches_independent_hkdf(purpose: Purpose) -> None:
    with derive_subkey(_key(ROOT), purpose) as sub:
        assert sub.bytes_for_call() == _hkdf_sha256(ROOT, purpose.label)


def test_fingerprint_known_answer() -> None:
    fp_key = _hkdf_sha256(ROOT, b"spike/v1/fingerprint")
    expected = hmac.new(fp_key, FINGERPRINT_MESSAGE, hashlib.sha256).digest()[:16]
    key = _key(ROOT)
    assert fingerprint(key) == expected
    assert fingerprint_hex(key) == expected.hex()
    assert len(expected) == 16


def test_subkeys_differ_per_purpose_and_per_root() -> None:
    key = _key(ROOT)
    subs = {derive_subkey(key, p).bytes_for_call() for p in Purpose}
    assert len(subs) == len(Purpose)
    other = SecretKey.generate()
    assert fingerprint(other) != fingerprint(key)


def test_fingerprints_equal() -> None:
    assert fingerprints_equal(b"a" * 16, b"a" * 16)
    assert not fingerprints_equal(b"a" * 16, b"b" * 16)


def test_aead_key_refuses_fingerprint_purpose_and_wipes() -> None:
    key = _key(ROOT)
    with pytest.raises(ValueError):
        AeadKey(key, Purpose.FINGERPRINT)
    aead = AeadKey(key, Purpose.SECRETS)
    assert "REDACTED" in repr(aead)
    aead.wipe()
    assert aead.wiped
    with pytest.raises(ValueError):
        _ = aead.aead
