"""The record envelope: a versioned, generation-tagged AES-256-GCM ciphertext.

Layout (all integers big-endian)::

    offset  size  field
    0       1     format version (= 1)
    1       4     root key generation (1 .. 2**32-1)
    5       12    random nonce
    17      n+16  AES-256-GCM ciphertext || tag

Associated data = the 17-byte header (version, generation, nonce) || record identity. The
identity (see :func:`record_identity`) names the row (kind, path, version), so a ciphertext moved
to another row, re-labelled with another generation or edited in any byte fails to decrypt.

Every decryption failure raises the same opaque :class:`DecryptionError`; ``ValueError`` is only
for programmer misuse (bad generation number, wrong argument types).
"""

from __future__ import annotations

import functools
import os
import struct

from cryptography.exceptions import InvalidTag

from nexus.crypto.keys import AeadKey

__all__ = [
    "ENVELOPE_VERSION",
    "HEADER_SIZE",
    "MAX_GENERATION",
    "NONCE_SIZE",
    "OVERHEAD",
    "TAG_SIZE",
    "DecryptionError",
    "decrypt",
    "encrypt",
    "peek_generation",
    "record_identity",
]

ENVELOPE_VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE
MAX_GENERATION = 2**32 - 1
_IDENTITY_TAG = b"spike/v1/record-identity"
_MAX_RECORD_VERSION = 2**64 - 1


class DecryptionError(Exception):
    """A ciphertext could not be decrypted: malformed, tampered, wrong key or wrong identity.

    Deliberately opaque (one type, fixed message): never branch on the reason.
    """

    def __init__(self) -> None:
        super().__init__("record could not be decrypted")


def _check_generation(generation: int) -> None:
    if not isinstance(generation, int) or isinstance(generation, bool):
        raise ValueError("generation must be an int")
    if not 1 <= generation <= MAX_GENERATION:
        raise ValueError("generation must be in 1 .. 2**32-1")


def record_identity(kind: str, path: str, version: int) -> bytes:
    """Encode a record's identity for use as associated data.

    Every field is length-prefixed (u32 length || UTF-8 bytes; version as u64), so no two
    different ``(kind, path, version)`` triples encode to the same bytes.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError("kind must be a non-empty str")
    if not isinstance(path, str):
        raise ValueError("path must be a str")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError("version must be an int")
    if not 0 <= version <= _MAX_RECORD_VERSION:
        raise ValueError("version must be in 0 .. 2**64-1")
    path_b = path.encode("utf-8")
    return _identity_prefix(kind) + _U32.pack(len(path_b)) + path_b + _U64.pack(version)


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


@functools.lru_cache(maxsize=32)
def _identity_prefix(kind: str) -> bytes:
    """tag || kind, length-prefixed: the same for every record of a kind (hot in rotation)."""
    kind_b = kind.encode("utf-8")
    return _U32.pack(len(_IDENTITY_TAG)) + _IDENTITY_TAG + _U32.pack(len(kind_b)) + kind_b


def peek_generation(blob: bytes) -> int:
    """Read the root key generation from an envelope header without any key.

    Raises :class:`DecryptionError` when the blob is too short or of an unknown version.
    """
    if len(blob) < OVERHEAD:
        raise DecryptionError()
    version, generation = _HEADER.unpack_from(blob, 0)
    if version != ENVELOPE_VERSION or generation == 0:
        raise DecryptionError()
    return int(generation)


def _encrypt_with_nonce(
    key: AeadKey, generation: int, plaintext: bytes, identity: bytes, nonce: bytes
) -> bytes:
    _check_generation(generation)
    if len(nonce) != NONCE_SIZE:
        raise ValueError("nonce must be 12 bytes")
    if not isinstance(identity, bytes | bytearray):
        raise ValueError("record identity must be bytes (see record_identity())")
    header = _HEADER.pack(ENVELOPE_VERSION, generation) + nonce
    ciphertext = key.aead.encrypt(nonce, plaintext, header + identity)
    return header + ciphertext


def encrypt(key: AeadKey, generation: int, plaintext: bytes, identity: bytes) -> bytes:
    """Encrypt ``plaintext`` under ``key`` (of root key ``generation``) for one record.

    ``identity`` comes from :func:`record_identity`. A fresh random 96-bit nonce is used for
    every call; callers must rotate before 2**32 encryptions per key (NIST SP 800-38D).
    """
    return _encrypt_with_nonce(key, generation, plaintext, identity, os.urandom(NONCE_SIZE))


def decrypt(
    key: AeadKey,
    blob: bytes,
    identity: bytes,
    *,
    expected_generation: int | None = None,
) -> bytes:
    """Decrypt an envelope made by :func:`encrypt` for the same record identity.

    When ``expected_generation`` is given the header must name it. Raises
    :class:`DecryptionError` on any failure.
    """
    if not isinstance(identity, bytes | bytearray):
        raise ValueError("record identity must be bytes (see record_identity())")
    generation = peek_generation(blob)
    if expected_generation is not None and generation != expected_generation:
        raise DecryptionError()
    view = memoryview(blob)
    header = bytes(view[:HEADER_SIZE])
    nonce = header[_HEADER.size :]
    try:
        return key.aead.decrypt(nonce, view[HEADER_SIZE:], header + identity)
    except InvalidTag:
        raise DecryptionError() from None
