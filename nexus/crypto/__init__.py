"""Pure cryptography for Nexus: the only package that imports cryptography hazmat or argon2.

Key hierarchy: password -(Argon2id)-> backup key pair -(HPKE)-> root keys (one per generation)
-(HKDF)-> per-purpose AES-256-GCM sub-keys -> record envelopes. See the module docstrings of
``secret_buffer``, ``keys``, ``envelope``, ``keyring`` and ``kdf``; the backup (the first two
steps' file format) lives in :mod:`nexus.backup`.
"""

from nexus.crypto.envelope import DecryptionError, peek_generation, record_identity
from nexus.crypto.hardening import HardeningReport, harden_process, secret_memory_status
from nexus.crypto.kdf import KdfParams
from nexus.crypto.keyring import Keyring, KeyringEntry, UnknownGeneration
from nexus.crypto.keys import Purpose, fingerprint, fingerprint_hex, fingerprints_equal
from nexus.crypto.secret_buffer import SecretBuffer, SecretKey

__all__ = [
    "DecryptionError",
    "HardeningReport",
    "KdfParams",
    "Keyring",
    "KeyringEntry",
    "Purpose",
    "SecretBuffer",
    "SecretKey",
    "UnknownGeneration",
    "fingerprint",
    "fingerprint_hex",
    "fingerprints_equal",
    "harden_process",
    "peek_generation",
    "record_identity",
    "secret_memory_status",
]
