"""The password-sealed root key backup (docs/security.md, "The backup").

How it works::

    Argon2id(password, salt, params) -> 96 bytes
        -> ML-KEM-768 seed (64 bytes) || X25519 private key (32 bytes)
        -> HPKE key pair, suite MLKEM768_X25519 / HKDF-SHA256 / AES-256-GCM (RFC 9180)

Only the public key is stored. Every root key generation is sealed to it with HPKE single-shot
``Suite.encrypt`` whose ``info`` binds the backup format version, the generation and the key's
fingerprint, so Nexus can re-seal after every rotation without knowing the password, and a
sealed key cannot be relabelled as another generation.

File format (UTF-8 JSON, one object, no other keys allowed)::

    {
      "format": "spike-nexus-backup",
      "version": 1,
      "kdf": {"algorithm": "argon2id", "argon2_version": 19, "time_cost": 3,
              "memory_kib": 65536, "parallelism": 4, "out_len": 96},
      "salt": "<base64, 16..64 bytes>",
      "hpke": {"kem": "MLKEM768_X25519", "kdf": "HKDF_SHA256", "aead": "AES_256_GCM"},
      "public_key": "<base64: ML-KEM-768 encapsulation key (1184) || X25519 public key (32)>",
      "generations": [
        {"generation": 1, "fingerprint": "<32 hex chars>", "sealed": "<base64, 1168 bytes>"}
      ],
      "checksum": "sha256:<hex SHA-256 of the canonical JSON of every other field>"
    }

The canonical JSON is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)``. The checksum needs no password: it tells a corrupt file
(:class:`BackupCorrupt`) apart from a wrong password (:class:`WrongPassword`).

Exceptions: :class:`BackupError` is the root; :class:`WrongPassword`; :class:`BackupCorrupt`
with the subclasses :class:`BackupVersionUnsupported`, :class:`BackupKdfRejected` and
:class:`FingerprintMismatch`. ``ValueError`` is for programmer misuse. No message ever
contains key material or the password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from nexus.backup.file import MAX_BACKUP_SIZE
from nexus.crypto import kdf
from nexus.crypto.envelope import MAX_GENERATION
from nexus.crypto.kdf import KdfBound, KdfParams
from nexus.crypto.keys import FINGERPRINT_SIZE, fingerprint, fingerprints_equal
from nexus.crypto.secret_buffer import ROOT_KEY_SIZE, SecretBuffer, SecretKey
from spike.memory import wipe_bytearray

__all__ = [
    "BACKUP_FORMAT",
    "BACKUP_FORMAT_VERSION",
    "MAX_GENERATIONS",
    "Backup",
    "BackupCorrupt",
    "BackupError",
    "BackupKdfRejected",
    "BackupPublicKey",
    "BackupVersionUnsupported",
    "FingerprintMismatch",
    "SealedGeneration",
    "WrongPassword",
    "check_kdf_bound",
    "create_backup",
    "create_backup_with_record_key",
    "open_backup",
    "record_tag",
    "record_tag_valid",
    "verify_structure",
]

BACKUP_FORMAT = "spike-nexus-backup"
BACKUP_FORMAT_VERSION = 1
MAX_GENERATIONS = 256

_SEED_LEN = 96  # 64-byte ML-KEM-768 seed || 32-byte X25519 private key
_MLKEM_SEED_LEN = 64
_MLKEM_PUBLIC_LEN = 1184
_X25519_PUBLIC_LEN = 32
PUBLIC_KEY_LEN = _MLKEM_PUBLIC_LEN + _X25519_PUBLIC_LEN
_AEAD_TAG_LEN = 16
SEALED_LEN = hpke.KEM.MLKEM768_X25519.enc_length() + ROOT_KEY_SIZE + _AEAD_TAG_LEN
_INFO_LABEL = b"spike/v1/backup/root-key"
_HPKE_NAMES = {"kem": "MLKEM768_X25519", "kdf": "HKDF_SHA256", "aead": "AES_256_GCM"}
_ARGON2_VERSION = 0x13
_HEX_FP = re.compile(r"[0-9a-f]{32}")
_HEX_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def _suite() -> hpke.Suite:
    return hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


# --- exceptions -------------------------------------------------------------------------------


class BackupError(Exception):
    """Root of every backup error."""


class WrongPassword(BackupError):
    """The password does not derive the backup's public key."""

    def __init__(self) -> None:
        super().__init__("the password does not open this backup")


class BackupCorrupt(BackupError):
    """The backup is damaged, truncated, malformed or was tampered with."""


class BackupVersionUnsupported(BackupCorrupt):
    """The backup declares a format version this build does not know."""


class BackupKdfRejected(BackupCorrupt):
    """The backup's KDF parameters are unsafe (too weak, or absurdly expensive)."""


class FingerprintMismatch(BackupCorrupt):
    """A recovered key does not have the fingerprint recorded for its generation."""


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupPublicKey:
    """The HPKE public key a backup seals to: ML-KEM-768 key || X25519 key (1216 bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_KEY_LEN:
            raise ValueError("backup public key has the wrong length")

    def to_hpke(self) -> hpke.MLKEM768X25519PublicKey:
        """Build the ``cryptography`` public key object (``ValueError`` if malformed)."""
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM_PUBLIC_LEN]),
            x25519.X25519PublicKey.from_public_bytes(self.raw[_MLKEM_PUBLIC_LEN:]),
        )

    @property
    def digest_hex(self) -> str:
        """SHA-256 of the raw public key, hex (handy to show which password-key is in use)."""
        return hashlib.sha256(self.raw).hexdigest()

    def __repr__(self) -> str:
        return f"BackupPublicKey(sha256={self.digest_hex[:16]}...)"


@dataclass(frozen=True)
class SealedGeneration:
    """One root key generation sealed to the backup public key."""

    generation: int
    fingerprint: bytes
    sealed: bytes

    def __repr__(self) -> str:
        return (
            f"SealedGeneration(generation={self.generation}, "
            f"fingerprint={self.fingerprint.hex()}, sealed=<{len(self.sealed)} bytes>)"
        )


def _info(generation: int, fp: bytes) -> bytes:
    return _INFO_LABEL + struct.pack(">BI", BACKUP_FORMAT_VERSION, generation) + fp


def _check_keys(keys: Mapping[int, SecretKey]) -> None:
    if not keys:
        raise ValueError("a backup needs at least one root key generation")
    if len(keys) > MAX_GENERATIONS:
        raise ValueError(f"a backup holds at most {MAX_GENERATIONS} generations")
    for generation, key in keys.items():
        if not isinstance(generation, int) or isinstance(generation, bool):
            raise ValueError("generations must be ints")
        if not 1 <= generation <= MAX_GENERATION:
            raise ValueError("generation must be in 1 .. 2**32-1")
        if not isinstance(key, SecretKey) or key.wiped:
            raise ValueError(f"generation {generation}: not a live SecretKey")


def _seal_all(
    public_key: BackupPublicKey, keys: Mapping[int, SecretKey]
) -> tuple[SealedGeneration, ...]:
    _check_keys(keys)
    suite = _suite()
    pk = public_key.to_hpke()
    sealed = []
    for generation in sorted(keys):
        key = keys[generation]
        fp = fingerprint(key)
        with key.view() as plaintext:
            blob = suite.encrypt(plaintext, pk, info=_info(generation, fp))
        sealed.append(SealedGeneration(generation, fp, blob))
    return tuple(sealed)


def _private_key(seed: memoryview) -> hpke.MLKEM768X25519PrivateKey:
    # OpenSSL keeps its own copy of the expanded key inside these objects; they are dropped as
    # soon as the caller is done (best effort, as documented in secret_buffer).
    return hpke.MLKEM768X25519PrivateKey(
        mlkem.MLKEM768PrivateKey.from_seed_bytes(seed[:_MLKEM_SEED_LEN]),
        x25519.X25519PrivateKey.from_private_bytes(seed[_MLKEM_SEED_LEN:_SEED_LEN]),
    )


def _public_bytes(seed: memoryview) -> bytes:
    # The hybrid key object exposes no serialisation: rebuild each half's public key.
    mlkem_pub = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed[:_MLKEM_SEED_LEN]).public_key()
    x_pub = x25519.X25519PrivateKey.from_private_bytes(seed[_MLKEM_SEED_LEN:_SEED_LEN]).public_key()
    return mlkem_pub.public_bytes_raw() + x_pub.public_bytes_raw()


@dataclass(frozen=True)
class Backup:
    """A parsed or freshly created backup. Immutable; :meth:`reseal` returns a new one."""

    params: KdfParams
    salt: bytes
    public_key: BackupPublicKey
    sealed: tuple[SealedGeneration, ...]

    @property
    def generations(self) -> tuple[int, ...]:
        """Sealed generations, ascending."""
        return tuple(s.generation for s in self.sealed)

    def fingerprints(self) -> dict[int, bytes]:
        """Generation -> recorded fingerprint."""
        return {s.generation: s.fingerprint for s in self.sealed}

    def matches(self, fingerprints: Mapping[int, bytes]) -> bool:
        """True when the backup holds exactly these generations with these fingerprints."""
        mine = self.fingerprints()
        if set(mine) != set(fingerprints):
            return False
        ok = True
        for generation, fp in fingerprints.items():
            ok &= fingerprints_equal(mine[generation], fp)
        return ok

    def reseal(self, keys: Mapping[int, SecretKey]) -> Backup:
        """Return a backup sealing exactly ``keys`` to the same public key. No password needed.

        ``keys`` must be every generation still needed (during a rotation: old and new). A key
        whose generation is already sealed here must have the recorded fingerprint
        (``ValueError`` otherwise: a different key under a known generation would orphan data).
        """
        _check_keys(keys)
        recorded = self.fingerprints()
        for generation, key in keys.items():
            if generation in recorded and not fingerprints_equal(
                recorded[generation], fingerprint(key)
            ):
                raise ValueError(
                    f"generation {generation}: key does not match the fingerprint in the backup"
                )
        return replace(self, sealed=_seal_all(self.public_key, keys))

    def to_bytes(self) -> bytes:
        """Serialise to the JSON file format (see module docstring)."""
        body = _body(self)
        body["checksum"] = _checksum(body)
        return (json.dumps(body, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, *, allow_insecure_kdf_for_tests: bool = False) -> Backup:
        """Parse and verify a backup file (no password needed).

        Raises :class:`BackupVersionUnsupported` for an unknown format version,
        :class:`BackupKdfRejected` for unsafe KDF parameters (sub-OWASP costs are accepted only
        with ``allow_insecure_kdf_for_tests``) and :class:`BackupCorrupt` for anything else wrong.
        """
        if not isinstance(data, bytes | bytearray):
            raise ValueError("backup data must be bytes")
        try:
            return _parse(data, allow_insecure_kdf_for_tests)
        except BackupError:
            raise
        except Exception as exc:
            # Whatever a hostile or damaged file makes a lower layer raise (a ValueError
            # from a 4,300-digit integer, ...) is a corrupt backup, never an internal error.
            # The type only: the text may quote the file.
            raise BackupCorrupt(f"backup is malformed ({type(exc).__name__})") from None

    def __repr__(self) -> str:
        return (
            f"Backup(version={BACKUP_FORMAT_VERSION}, generations={list(self.generations)}, "
            f"kdf=argon2id(t={self.params.time_cost}, m={self.params.memory_kib}KiB, "
            f"p={self.params.parallelism}), public_key={self.public_key!r})"
        )


# --- create / open ------------------------------------------------------------------------------


# --- generation records ----------------------------------------------------------------------
#
# The backup's public key is in the file, so anyone can seal a key to it; and the store's record
# of each generation (its fingerprint) is plaintext. Whoever can write both could plant a key.
# So every generation record is authenticated: an HMAC-SHA256 tag under the *record key*, which
# is derived from the same Argon2id output as the backup key pair (no extra KDF run) and so is
# known only to someone who knows the password. Nexus keeps it in memory (a SecretBuffer) while
# unsealed, to tag the record of each new generation a rotation creates without the password.

RECORD_KEY_LEN = 32
_RECORD_KEY_LABEL = b"spike/v1/backup/generation-record-key"
_RECORD_TAG_LABEL = b"spike/v1/generation-record"


def _hmac_sha256(key: memoryview, message: bytes) -> bytes:
    mac = crypto_hmac.HMAC(key, hashes.SHA256())  # reads the key in place (no bytes copy)
    mac.update(message)
    return mac.finalize()


def _record_key(seed: memoryview) -> SecretBuffer:
    return SecretBuffer.from_bytes_consuming(
        bytearray(_hmac_sha256(seed[:_SEED_LEN], _RECORD_KEY_LABEL)))


def record_tag(record_key: SecretBuffer, generation: int, fp: bytes) -> str:
    """The tag (hex) of generation ``generation``'s record with fingerprint ``fp``."""
    if not 1 <= generation <= MAX_GENERATION or len(fp) != FINGERPRINT_SIZE:
        raise ValueError("not a generation record")
    message = _RECORD_TAG_LABEL + struct.pack(">I", generation) + fp
    with record_key.view() as key:
        return _hmac_sha256(key, message).hex()


def record_tag_valid(record_key: SecretBuffer, generation: int, fp: bytes, tag: object) -> bool:
    """Constant-time check of a stored tag (False for anything malformed)."""
    if not isinstance(tag, str) or len(tag) != 64:
        return False
    try:
        expected = record_tag(record_key, generation, fp)
    except ValueError:
        return False
    return hmac.compare_digest(expected, tag)


def create_backup(
    password: bytearray, keys: Mapping[int, SecretKey], params: KdfParams | None = None
) -> tuple[Backup, BackupPublicKey]:
    """:func:`create_backup_with_record_key` without the record key."""
    backup, public_key, record_key = create_backup_with_record_key(password, keys, params)
    record_key.wipe()
    return backup, public_key


def create_backup_with_record_key(
    password: bytearray, keys: Mapping[int, SecretKey], params: KdfParams | None = None
) -> tuple[Backup, BackupPublicKey, SecretBuffer]:
    """Derive the backup key pair from ``password`` and seal every key in ``keys`` to it.

    Also returns the record key (see :func:`record_tag`), which the caller wipes.

    ``params`` default to :class:`KdfParams` (RFC 9106); they are validated (``ValueError``).
    The caller keeps ownership of ``password`` and should wipe it afterwards.
    """
    params = params or KdfParams()
    params.validate()
    if params.out_len != _SEED_LEN:
        raise ValueError(f"backup KDF output must be {_SEED_LEN} bytes")
    _check_keys(keys)
    salt = os.urandom(params.salt_len)
    with kdf.derive(password, salt, params) as seed_buf, seed_buf.view() as seed:
        public_key = BackupPublicKey(_public_bytes(seed))
        record_key = _record_key(seed)
    try:
        backup = Backup(params, salt, public_key, _seal_all(public_key, keys))
    except BaseException:
        record_key.wipe()
        raise
    return backup, public_key, record_key


def check_kdf_bound(backup: Backup, bound: KdfBound) -> None:
    """:class:`BackupKdfRejected` when the backup's Argon2id costs exceed ``bound``.

    No password and no Argon2 run: this is what keeps a hostile backup (a "KDF bomb") from
    costing gigabytes of memory and seconds under the lifecycle lock.
    """
    try:
        bound.check(backup.params)
    except ValueError as exc:
        raise BackupKdfRejected(str(exc)) from None


def open_backup(
    backup: Backup, password: bytearray, *, bound: KdfBound | None = None
) -> tuple[dict[int, SecretKey], SecretBuffer]:
    """Recover every sealed root key with ``password``, and the record key (caller wipes).

    With ``bound``, the backup's KDF costs are checked against it first
    (:class:`BackupKdfRejected`, before any Argon2 run).
    Checks first that the password derives the stored public key (:class:`WrongPassword`), then
    opens every generation and checks its fingerprint (:class:`BackupCorrupt`,
    :class:`FingerprintMismatch`). Either all keys are returned or none (partial results are
    wiped). The caller keeps ownership of ``password``.
    """
    verify_structure(backup)
    if bound is not None:
        check_kdf_bound(backup, bound)
    recovered: dict[int, SecretKey] = {}
    record_key: SecretBuffer | None = None
    try:
        with kdf.derive(password, backup.salt, backup.params) as seed_buf, seed_buf.view() as seed:
            # Check the password before touching any sealed blob.
            if not hmac.compare_digest(_public_bytes(seed), backup.public_key.raw):
                raise WrongPassword()
            record_key = _record_key(seed)
            private_key = _private_key(seed)
            suite = _suite()
            for item in backup.sealed:
                recovered[item.generation] = _open_sealed(suite, private_key, item)
            del private_key
    except BaseException:
        for key in recovered.values():
            key.wipe()
        if record_key is not None:
            record_key.wipe()
        raise
    assert record_key is not None
    return recovered, record_key


def _open_sealed(suite: hpke.Suite, private_key: hpke.MLKEM768X25519PrivateKey,
                 item: SealedGeneration) -> SecretKey:
    """One generation's root key, checked against its recorded fingerprint."""
    try:
        plain = bytearray(
            suite.decrypt(item.sealed, private_key, info=_info(item.generation, item.fingerprint))
        )
    except Exception:
        raise BackupCorrupt(f"generation {item.generation}: sealed key failed to open") from None
    if len(plain) != ROOT_KEY_SIZE:
        wipe_bytearray(plain)
        raise BackupCorrupt(f"generation {item.generation}: wrong key length")
    key = SecretKey.from_bytes_consuming(plain)
    if not fingerprints_equal(fingerprint(key), item.fingerprint):
        key.wipe()
        raise FingerprintMismatch(
            f"generation {item.generation}: recovered key does not match its recorded fingerprint"
        )
    return key


# --- structure ----------------------------------------------------------------------------------


def verify_structure(backup: Backup) -> None:
    """Check a backup's structure without the password (:class:`BackupCorrupt` if wrong)."""
    try:
        backup.params.validate()
    except ValueError as exc:
        raise BackupKdfRejected(f"unsafe KDF parameters: {exc}") from None
    if backup.params.out_len != _SEED_LEN:
        raise BackupKdfRejected(f"KDF output must be {_SEED_LEN} bytes")
    if len(backup.salt) != backup.params.salt_len:
        raise BackupCorrupt("salt length does not match the KDF parameters")
    try:
        backup.public_key.to_hpke()
    except ValueError:
        raise BackupCorrupt("public key is malformed") from None
    if not backup.sealed:
        raise BackupCorrupt("backup holds no root key generation")
    if len(backup.sealed) > MAX_GENERATIONS:
        raise BackupCorrupt("backup holds too many generations")
    previous = 0
    for item in backup.sealed:
        if not isinstance(item.generation, int) or isinstance(item.generation, bool):
            raise BackupCorrupt("generation is not an integer")
        if not previous < item.generation <= MAX_GENERATION:
            raise BackupCorrupt("generations must be unique, ascending and in range")
        previous = item.generation
        if len(item.fingerprint) != FINGERPRINT_SIZE:
            raise BackupCorrupt(f"generation {item.generation}: fingerprint has the wrong length")
        if len(item.sealed) != SEALED_LEN:
            raise BackupCorrupt(f"generation {item.generation}: sealed key has the wrong length")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _body(backup: Backup) -> dict[str, Any]:
    p = backup.params
    return {
        "format": BACKUP_FORMAT,
        "version": BACKUP_FORMAT_VERSION,
        "kdf": {
            "algorithm": "argon2id",
            "argon2_version": _ARGON2_VERSION,
            "time_cost": p.time_cost,
            "memory_kib": p.memory_kib,
            "parallelism": p.parallelism,
            "out_len": p.out_len,
        },
        "salt": _b64(backup.salt),
        "hpke": dict(_HPKE_NAMES),
        "public_key": _b64(backup.public_key.raw),
        "generations": [
            {
                "generation": s.generation,
                "fingerprint": s.fingerprint.hex(),
                "sealed": _b64(s.sealed),
            }
            for s in backup.sealed
        ],
    }


def _checksum(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BackupCorrupt("duplicate field in backup")
        out[key] = value
    return out


def _obj(value: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise BackupCorrupt(f"{what}: unexpected structure")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BackupCorrupt(f"{what}: not an integer")
    return value


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BackupCorrupt(f"{what}: not a string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise BackupCorrupt(f"{what}: not valid base64") from None
    if _b64(raw) != value:
        raise BackupCorrupt(f"{what}: non-canonical base64")
    return raw


_TOP_KEYS = {"format", "version", "kdf", "salt", "hpke", "public_key", "generations", "checksum"}
_KDF_KEYS = {"algorithm", "argon2_version", "time_cost", "memory_kib", "parallelism", "out_len"}


def _parse(data: bytes, allow_insecure: bool) -> Backup:
    if not isinstance(data, bytes | bytearray):
        raise ValueError("backup data must be bytes")
    if len(data) > MAX_BACKUP_SIZE:
        raise BackupCorrupt("backup file is too large")
    doc = _checked_document(_load_json(data))
    params, salt = _kdf_params_and_salt(doc, allow_insecure)
    try:
        public_key = BackupPublicKey(_unb64(doc["public_key"], "public_key"))
    except ValueError:
        raise BackupCorrupt("public key has the wrong length") from None
    backup = Backup(params, salt, public_key, _sealed_generations(doc["generations"]))
    verify_structure(backup)
    return backup


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BackupCorrupt("backup is not valid JSON (truncated or damaged)") from None
    except ValueError:
        # e.g. an integer of more than 4,300 digits (int_max_str_digits)
        raise BackupCorrupt("backup holds a number out of range") from None


def _checked_document(doc: Any) -> dict[str, Any]:
    """The top-level object, once its format, version, fields and checksum are right."""
    if not isinstance(doc, dict) or doc.get("format") != BACKUP_FORMAT:
        raise BackupCorrupt("not a SPIKE Nexus backup")
    version = doc.get("version")
    if version != BACKUP_FORMAT_VERSION or isinstance(version, bool):
        raise BackupVersionUnsupported(
            f"backup format version {version!r} is not supported "
            f"(this build reads version {BACKUP_FORMAT_VERSION})"
            if isinstance(version, int) and not isinstance(version, bool)
            else "backup format version is missing or malformed"
        )
    top = _obj(doc, _TOP_KEYS, "backup")
    body = {k: v for k, v in top.items() if k != "checksum"}
    checksum = top["checksum"]
    if not isinstance(checksum, str) or not _HEX_SHA256.fullmatch(checksum):
        raise BackupCorrupt("checksum field is malformed")
    if not hmac.compare_digest(_checksum(body), checksum):
        raise BackupCorrupt("checksum mismatch: the backup is damaged or was modified")
    return top


def _kdf_params_and_salt(doc: dict[str, Any], allow_insecure: bool) -> tuple[KdfParams, bytes]:
    kdf_doc = _obj(doc["kdf"], _KDF_KEYS, "kdf")
    if kdf_doc["algorithm"] != "argon2id" or kdf_doc["argon2_version"] != _ARGON2_VERSION:
        raise BackupKdfRejected("unsupported KDF")
    if doc["hpke"] != _HPKE_NAMES:
        raise BackupCorrupt("unsupported HPKE suite")
    salt = _unb64(doc["salt"], "salt")
    params = KdfParams(
        time_cost=_int(kdf_doc["time_cost"], "time_cost"),
        memory_kib=_int(kdf_doc["memory_kib"], "memory_kib"),
        parallelism=_int(kdf_doc["parallelism"], "parallelism"),
        salt_len=len(salt),
        out_len=_int(kdf_doc["out_len"], "out_len"),
    )
    if allow_insecure and not params.meets_owasp_minimum:
        params = replace(params, insecure_for_tests_only=True)
    return params, salt


def _sealed_generations(generations: Any) -> tuple[SealedGeneration, ...]:
    if not isinstance(generations, list):
        raise BackupCorrupt("generations: not a list")
    if len(generations) > MAX_GENERATIONS:
        raise BackupCorrupt("backup holds too many generations")
    sealed = []
    for entry in generations:
        item = _obj(entry, {"generation", "fingerprint", "sealed"}, "generation entry")
        fp = item["fingerprint"]
        if not isinstance(fp, str) or not _HEX_FP.fullmatch(fp):
            raise BackupCorrupt("fingerprint is malformed")
        sealed.append(
            SealedGeneration(
                generation=_int(item["generation"], "generation"),
                fingerprint=bytes.fromhex(fp),
                sealed=_unb64(item["sealed"], "sealed"),
            )
        )
    return tuple(sealed)
