"""Sub-keys derived from a root key, one per purpose, and the root key fingerprint.

Every sub-key is ``HKDF-SHA256(ikm=root key, salt=none, info=label, L=32)`` (RFC 5869) with a
distinct label, so a key is used for exactly one purpose. The fingerprint is a key check value:
``HMAC-SHA256(fingerprint sub-key, FINGERPRINT_MESSAGE)[:16]`` — it identifies a root key without
revealing anything usable about it, and it is what the backup and the store record.
"""

from __future__ import annotations

import enum
import hmac
from typing import NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nexus.crypto.secret_buffer import SecretBuffer, SecretKey

__all__ = [
    "FINGERPRINT_MESSAGE",
    "FINGERPRINT_SIZE",
    "SUBKEY_SIZE",
    "AeadKey",
    "Purpose",
    "derive_subkey",
    "fingerprint",
    "fingerprint_hex",
    "fingerprints_equal",
]

SUBKEY_SIZE = 32
FINGERPRINT_SIZE = 16
FINGERPRINT_MESSAGE = b"spike/v1/fingerprint/key-check-value"


class Purpose(enum.Enum):
    """What a sub-key is for; the value is its HKDF label."""

    SECRETS = b"spike/v1/secrets"
    POLICIES = b"spike/v1/policies"
    METADATA = b"spike/v1/metadata"
    KEYRING = b"spike/v1/keyring"  # wraps the next generation (the keyring of record)
    FINGERPRINT = b"spike/v1/fingerprint"

    @property
    def label(self) -> bytes:
        """The HKDF ``info`` label."""
        label: bytes = self.value
        return label

    @property
    def is_encryption(self) -> bool:
        """True for purposes whose sub-key encrypts records (everything but the fingerprint)."""
        return self is not Purpose.FINGERPRINT


ENCRYPTION_PURPOSES: tuple[Purpose, ...] = tuple(p for p in Purpose if p.is_encryption)


def derive_subkey(root_key: SecretKey, purpose: Purpose) -> SecretBuffer:
    """Derive the 32-byte sub-key for ``purpose`` straight into protected memory."""
    if not isinstance(purpose, Purpose):
        raise TypeError("purpose must be a Purpose")
    out = SecretBuffer(SUBKEY_SIZE)
    try:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=SUBKEY_SIZE, salt=None, info=purpose.label)
        with root_key.view() as ikm, out.writable_view() as target:
            hkdf.derive_into(ikm, target)
    except BaseException:
        out.wipe()
        raise
    return out


def fingerprint(root_key: SecretKey) -> bytes:
    """Return the 16-byte key check value of ``root_key`` (safe to store and show)."""
    with derive_subkey(root_key, Purpose.FINGERPRINT) as sub, sub.view() as key:
        mac = crypto_hmac.HMAC(key, hashes.SHA256())
        mac.update(FINGERPRINT_MESSAGE)
        return mac.finalize()[:FINGERPRINT_SIZE]


def fingerprint_hex(root_key: SecretKey) -> str:
    """Hex form of :func:`fingerprint`, for logs, audit and status output."""
    return fingerprint(root_key).hex()


def fingerprints_equal(a: bytes, b: bytes) -> bool:
    """Compare two fingerprints in constant time."""
    return hmac.compare_digest(a, b)


class AeadKey:
    """An AES-256-GCM key for one purpose of one root key generation.

    Holds the sub-key in a :class:`SecretBuffer` and a cached ``AESGCM`` object built from it
    (OpenSSL keeps its own copy of the key schedule inside that object: dropping it on
    :meth:`wipe` is the best we can do).
    """

    __slots__ = ("_aead", "_buffer", "purpose")

    def __init__(self, root_key: SecretKey, purpose: Purpose) -> None:
        if not purpose.is_encryption:
            raise ValueError("the fingerprint sub-key is not an encryption key")
        self.purpose = purpose
        self._buffer = derive_subkey(root_key, purpose)
        with self._buffer.view() as key:
            self._aead: AESGCM | None = AESGCM(key)

    @property
    def aead(self) -> AESGCM:
        """The cached cipher object (raises ``ValueError`` once wiped)."""
        if self._aead is None:
            raise ValueError("AEAD key has been wiped")
        return self._aead

    @property
    def wiped(self) -> bool:
        """True once :meth:`wipe` has run."""
        return self._aead is None

    def wipe(self) -> None:
        """Drop the cipher object and zero the sub-key. Idempotent."""
        self._aead = None
        self._buffer.wipe()

    def __repr__(self) -> str:
        return f"<AeadKey purpose={self.purpose.name} [REDACTED]>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("AeadKey cannot be pickled")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("AeadKey cannot be pickled")
