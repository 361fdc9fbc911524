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
    "Resealer",
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
    return _identity(_identity_prefix(kind), path, version)


def _identity(prefix: bytes, path: str, version: int) -> bytes:
    """prefix || len(path) || path || version: the checked-argument-free core of
    :func:`record_identity`, also used per row by :class:`Resealer`."""
    path_b = path.encode("utf-8")
    return prefix + _U32.pack(len(path_b)) + path_b + _U64.pack(version)


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


NONCE_POOL = 256


class SealCheckFailed(Exception):
    """A ciphertext just made does not open under the key that made it (key memory damaged
    or a broken cipher): nothing may be written with that key."""


class Resealer:
    """Re-encrypts records to one target generation, and checks them under it: the hot
    loops of key rotation, a million rows at a time.

    Same envelope and associated data as :func:`encrypt` / :func:`decrypt` (tests check
    that each side opens what the other made), without their per-call argument checks:
    the keys are resolved once, the identity prefix is built once per kind, and one
    method call does the whole row. ``openers`` maps each generation that may be found
    in a header to its AEAD key for this purpose; a header naming any other generation,
    a malformed blob or a failed tag all come back as ``None`` / ``False``.
    """

    __slots__ = ("_at", "_nonces", "_openers", "_prefix", "_seal", "_target_header",
                 "_urandom")

    def __init__(self, kind: str, openers: dict[int, AeadKey], sealer: AeadKey,
                 target: int) -> None:
        _check_generation(target)
        record_identity(kind, "", 0)  # validates kind
        self._prefix = _identity_prefix(kind)
        self._openers = {g: k.aead for g, k in openers.items()}
        self._seal = sealer.aead
        self._target_header = _HEADER.pack(ENVELOPE_VERSION, target)
        self._urandom = os.urandom
        # Fresh random nonces drawn NONCE_POOL at a time (one getrandom call instead of one
        # per record); each is used once.
        self._nonces = b""
        self._at = 0

    def _nonce(self) -> bytes:
        at = self._at
        if at >= len(self._nonces):
            self._nonces, at = self._urandom(NONCE_SIZE * NONCE_POOL), 0
        self._at = at + NONCE_SIZE
        return self._nonces[at:at + NONCE_SIZE]

    def reseal(self, path: str, version: int, blob: bytes) -> bytes | None:
        """``blob`` decrypted under the generation its header names and encrypted under
        the target generation, or ``None`` if it does not decrypt."""
        identity = _identity(self._prefix, path, version)
        if len(blob) < OVERHEAD:
            return None
        fmt, generation = _HEADER.unpack_from(blob, 0)
        aead = self._openers.get(generation)
        if aead is None or fmt != ENVELOPE_VERSION:
            return None
        view = memoryview(blob)
        header = blob[:HEADER_SIZE]
        try:
            plain = aead.decrypt(header[_HEADER.size:], view[HEADER_SIZE:], header + identity)
        except InvalidTag:
            return None
        nonce = self._nonce()
        header = self._target_header + nonce
        return header + self._seal.encrypt(nonce, plain, header + identity)

    def reseal_checked(self, path: str, version: int, blob: bytes) -> bytes | None:
        """:meth:`reseal`, and the new ciphertext is opened again under the target key and
        must give back the same plaintext before it is returned (key rotation's proof, in
        memory, that what it writes decrypts under the new key). ``None`` if ``blob`` does
        not decrypt; :class:`SealCheckFailed` (no data in it) if the new one does not."""
        path_b = path.encode("utf-8")
        identity = self._prefix + _U32.pack(len(path_b)) + path_b + _U64.pack(version)
        if len(blob) < OVERHEAD:
            return None
        fmt, generation = _HEADER.unpack_from(blob, 0)
        aead = self._openers.get(generation)
        if aead is None or fmt != ENVELOPE_VERSION:
            return None
        header = blob[:HEADER_SIZE]
        try:
            plain = aead.decrypt(header[_HEADER.size:], memoryview(blob)[HEADER_SIZE:],
                                 header + identity)
        except InvalidTag:
            return None
        nonce = self._nonce()
        header = self._target_header + nonce
        associated = header + identity
        sealed = self._seal.encrypt(nonce, plain, associated)
        try:
            if self._seal.decrypt(nonce, sealed, associated) != plain:
                raise SealCheckFailed()
        except InvalidTag:
            raise SealCheckFailed() from None
        return header + sealed

    def opens_under_target(self, path: str, version: int, blob: bytes) -> bool:
        """True when ``blob``'s header names the target generation and it decrypts under
        the target key (the sealer) for this record."""
        if len(blob) < OVERHEAD or not blob.startswith(self._target_header):
            return False
        header = blob[:HEADER_SIZE]
        try:
            self._seal.decrypt(header[_HEADER.size:], memoryview(blob)[HEADER_SIZE:],
                               header + _identity(self._prefix, path, version))
        except InvalidTag:
            return False
        return True
