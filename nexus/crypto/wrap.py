"""The keyring of record: each root key generation wrapped under the generation before it.

When a rotation creates generation ``g+1`` it stores ``wrap(g -> g+1)`` in the store, in the
same write that records ``g+1`` (:mod:`nexus.core.ledger`). Any node that holds ``g`` can then
take ``g+1`` into memory without the password and without a peer; one that holds no live
generation cannot read anything from it.

A wrap is AES-256-GCM under ``g``'s own sub-key for this purpose (``Purpose.KEYRING``, HKDF
from the root key, so the key wraps nothing else), with a fresh random nonce. The associated
data binds both generation numbers and both fingerprints, so a wrap cannot be replayed as
another generation, under another parent, or for another key. Unwrapping also checks the
unwrapped key's fingerprint, and writes the key straight into protected memory.

Layout: ``version (1) || nonce (12) || AES-GCM(key (32)) with its tag (16)`` = 61 bytes.
"""

from __future__ import annotations

import os
import struct

from nexus.crypto.keyring import KeyringEntry
from nexus.crypto.keys import FINGERPRINT_SIZE, Purpose, fingerprint, fingerprints_equal
from nexus.crypto.secret_buffer import ROOT_KEY_SIZE, SecretBuffer, SecretKey

WRAP_VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
WRAP_SIZE = 1 + NONCE_SIZE + ROOT_KEY_SIZE + TAG_SIZE
_AAD_LABEL = b"spike/v1/keyring-wrap"


class UnwrapError(Exception):
    """A wrapped generation that does not open, or opens to another key (never says more)."""


def _aad(parent: int, parent_fingerprint: bytes, generation: int,
         generation_fingerprint: bytes) -> bytes:
    if len(parent_fingerprint) != FINGERPRINT_SIZE or len(
            generation_fingerprint) != FINGERPRINT_SIZE:
        raise ValueError("fingerprints are 16 bytes")
    return (_AAD_LABEL + struct.pack(">BII", WRAP_VERSION, parent, generation)
            + parent_fingerprint + generation_fingerprint)


def wrap_generation(parent: KeyringEntry, generation: int, key: SecretKey) -> bytes:
    """``key`` (generation ``generation``) wrapped under ``parent``'s keyring sub-key."""
    if generation <= parent.generation:
        raise ValueError("a generation is wrapped under an older one")
    nonce = os.urandom(NONCE_SIZE)
    aad = _aad(parent.generation, parent.fingerprint, generation, fingerprint(key))
    with key.view() as plain:
        sealed = parent.aead(Purpose.KEYRING).aead.encrypt(nonce, plain, aad)
    return bytes([WRAP_VERSION]) + nonce + sealed


def unwrap_generation(parent: KeyringEntry, generation: int, expected_fingerprint: bytes,
                      blob: bytes) -> SecretKey:
    """The key of ``generation`` from its wrap under ``parent``; it must have
    ``expected_fingerprint`` (the ledger's record). Raises :class:`UnwrapError`."""
    if len(blob) != WRAP_SIZE or blob[0] != WRAP_VERSION:
        raise UnwrapError(f"generation {generation}: not a wrapped key of a known format")
    nonce, sealed = blob[1:1 + NONCE_SIZE], blob[1 + NONCE_SIZE:]
    aad = _aad(parent.generation, parent.fingerprint, generation, expected_fingerprint)
    out = SecretBuffer(ROOT_KEY_SIZE)
    try:
        with out.writable_view() as target:
            parent.aead(Purpose.KEYRING).aead.decrypt_into(nonce, sealed, aad, target)
    except Exception:
        out.wipe()
        raise UnwrapError(f"generation {generation}: the wrap under generation "
                          f"{parent.generation} does not open") from None
    key = SecretKey(out)
    if not fingerprints_equal(fingerprint(key), expected_fingerprint):
        key.wipe()
        raise UnwrapError(f"generation {generation}: the unwrapped key does not match its "
                          "recorded fingerprint")
    return key
