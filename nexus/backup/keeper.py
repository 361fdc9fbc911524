"""The server's backup file as Nexus keeps it: read, parsed, opened, written and checked.

:class:`BackupKeeper` owns the path, the backup Nexus currently seals to (only its *public* key
stays in memory, which lets Nexus re-seal after each rotation without the password) and the
file's health. It knows nothing of the lifecycle: the key manager decides when to open, write or
check. Errors are the domain's (:mod:`nexus.core.errors`): a corrupt or unusable backup is
:class:`~nexus.core.errors.BackupInvalid`, a wrong password
:class:`~nexus.core.errors.WrongPassword`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from nexus.backup.file import read_backup_file, write_backup_file
from nexus.backup.format import (
    Backup,
    BackupCorrupt,
    BackupVersionUnsupported,
    WrongPassword,
    check_kdf_bound,
    open_backup,
)
from nexus.core import errors
from nexus.core.password_policy import PasswordRejected, normalize_password
from nexus.crypto.kdf import KdfBound, KdfParams
from nexus.crypto.keyring import Keyring
from nexus.crypto.keys import fingerprint, fingerprints_equal
from nexus.crypto.secret_buffer import SecretBuffer, SecretKey
from spike.memory import wipe_bytearray
from spike.states import BackupStatus

log = structlog.get_logger("nexus.keys")

Signature = tuple[int, int, int, int]


@dataclass
class BackupHealth:
    status: BackupStatus = BackupStatus.UNKNOWN
    detail: str = ""
    last_written: float | None = None
    last_verified: float | None = None


def password_bytes(raw: bytes) -> bytearray:
    """Copy the request's password into a wipeable buffer, NFKC-normalised like at init."""
    try:
        return bytearray(normalize_password(raw).encode("utf-8"))
    except PasswordRejected as exc:
        raise errors.WrongPassword("the password does not open the backup") from exc


class BackupKeeper:
    def __init__(self, path: Path, kdf_params: KdfParams, *, allow_insecure_kdf: bool = False,
                 clock: Callable[[], float]) -> None:
        self.path = path
        # The costliest Argon2id a backup may ask of us (checked before any KDF run).
        self._kdf_bound = KdfBound.for_configured(kdf_params)
        self._allow_insecure_kdf = allow_insecure_kdf
        self._clock = clock
        self.current: Backup | None = None  # the backup Nexus seals to (public key only)
        self.health = BackupHealth()
        self._health_lock = threading.Lock()
        # The file's identity (inode, size, times) when it was last checked: status re-checks
        # a file that changed since, so it never reports a deleted file as "ok".
        self._verified_signature: Signature | None = None
        if path.exists():
            self.health.last_written = path.stat().st_mtime
        self.health.status = BackupStatus.UNKNOWN if path.exists() else BackupStatus.MISSING

    # ------------------------------------------------------------------ reading

    def file_bytes(self) -> bytes | None:
        try:
            return read_backup_file(self.path)
        except OSError:  # FileNotFoundError and BackupFileError included
            return None

    def parse(self, raw: bytes) -> Backup:
        try:
            return Backup.parse(raw, allow_insecure_kdf_for_tests=self._allow_insecure_kdf)
        except BackupVersionUnsupported as exc:
            raise errors.BackupInvalid(f"unsupported backup format: {exc}") from None
        except BackupCorrupt as exc:
            raise errors.BackupInvalid(f"the backup is corrupt: {exc}") from None

    def parse_for_opening(self, raw: bytes) -> Backup:
        """Parse a backup about to be opened with a password, and bound its KDF costs."""
        backup = self.parse(raw)
        try:
            check_kdf_bound(backup, self._kdf_bound)
        except BackupCorrupt as exc:
            raise errors.BackupInvalid(
                f"the backup is invalid: {exc} (if it was made with higher --kdf-* settings, "
                "start Nexus with those settings to open it)"
            ) from None
        return backup

    def load_server_file(self, missing: str) -> tuple[Backup, bytes]:
        """The server's file, parsed for opening (``missing``: the message when it is not
        there or unreadable)."""
        raw = self.file_bytes()
        if raw is None:
            raise errors.BackupInvalid(missing)
        return self.parse_for_opening(raw), raw

    def open(self, backup: Backup, password: bytes, *, subject: str,
             on_wrong_password: Callable[[], None]) -> tuple[dict[int, SecretKey], SecretBuffer]:
        """The one way to open a backup with a password: its keys and the record key (the
        caller wipes both). ``on_wrong_password`` runs when the password does not derive the
        backup's key pair, before :class:`errors.WrongPassword` ("... does not open
        ``subject``") is raised."""
        pw = password_bytes(password)
        try:
            return open_backup(backup, pw, bound=self._kdf_bound)
        except WrongPassword:
            on_wrong_password()
            raise errors.WrongPassword(f"the password does not open {subject}") from None
        except BackupCorrupt as exc:
            raise errors.BackupInvalid(f"the backup is invalid: {exc}") from None
        finally:
            wipe_bytearray(pw)

    def export(self) -> tuple[bytes, tuple[int, ...]]:
        """The server's file as it is (or the current backup when the file is unreadable)."""
        raw = self.file_bytes()
        if raw is None:
            if self.current is None:
                raise errors.BackupInvalid("no backup is available")
            raw = self.current.to_bytes()
        return raw, self.parse(raw).generations

    def generations(self) -> tuple[int, ...]:
        return self.current.generations if self.current else ()

    def kdf_description(self) -> str:
        params = self.current.params if self.current else None
        if params is None:
            return ""
        return (f"argon2id t={params.time_cost} m={params.memory_kib}KiB "
                f"p={params.parallelism}")

    # ------------------------------------------------------------------ writing

    def mark_ok(self, detail: str = "", *, now: float | None = None) -> None:
        """The one place that declares the backup good (checked, written, or opened and
        matched)."""
        self.health.status = BackupStatus.OK
        self.health.detail = detail
        self.health.last_verified = self._clock() if now is None else now

    def write(self, backup: Backup) -> None:
        """Write atomically, then read back and check: every change is verified."""
        data = backup.to_bytes()
        health = self.health
        try:
            write_backup_file(self.path, data)
        except OSError as exc:
            health.status = BackupStatus.UNKNOWN
            health.detail = f"write failed: {exc.strerror or exc}"
            raise errors.Unavailable(f"cannot write the backup file: {exc.strerror}") from None
        now = self._clock()
        health.last_written = now
        if self.file_bytes() != data:
            health.status = BackupStatus.CORRUPT
            health.detail = "read-back after write differs from what was written"
            raise errors.Unavailable("the backup file did not read back as written")
        self.parse_for_opening(data)  # structure and KDF bounds, as recovery will see them
        self.mark_ok(now=now)
        self._verified_signature = self._file_signature()

    def holds(self, backup: Backup) -> bool:
        """True when the server's file is a good copy of exactly ``backup``'s keys, sealed to
        the same password-key (nothing to write)."""
        raw = self.file_bytes()
        if raw is None:
            return False
        try:
            current = self.parse(raw)
        except errors.BackupInvalid:
            return False
        return (current.public_key == backup.public_key
                and current.matches(backup.fingerprints()))

    def set_aside_unusable(self, keys: Mapping[int, SecretKey]) -> None:
        """Move a corrupt or non-matching server file to ``<file>.corrupt`` before restoring.

        Otherwise writing the restored copy would rotate the bad file into ``<file>.prev``
        and push out the previous *good* copy.
        """
        path = self.path
        if not path.exists() and not path.is_symlink():
            return
        raw = self.file_bytes()
        if raw is not None:
            try:
                if self.parse(raw).matches({g: fingerprint(k) for g, k in keys.items()}):
                    return  # a good copy of these keys (another password): keep it as .prev
            except errors.BackupInvalid:
                pass
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except OSError as exc:
            log.warning("cannot move the unusable backup file aside", error=exc.strerror)
        else:
            log.warning("unusable backup file moved aside", path=str(aside))

    # ------------------------------------------------------------------ checking

    def _file_signature(self) -> Signature | None:
        """What identifies the file's current content cheaply (None when it is absent)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def file_changed(self) -> bool:
        """True when the file was deleted, replaced or modified since it was last checked."""
        return self._file_signature() != self._verified_signature

    def verify(self, keyring: Keyring) -> BackupHealth:
        """Check the file's structure and that it matches ``keyring`` (no password)."""
        with self._health_lock:
            signature = self._file_signature()
            now = self._clock()
            self._check_file(keyring, now)
            self.health.last_verified = now
            self._verified_signature = signature
            if self.health.status != BackupStatus.OK:
                log.warning("backup check failed", status=self.health.status,
                            detail=self.health.detail)
            return self.health

    def _check_file(self, keyring: Keyring, now: float) -> None:
        health = self.health
        try:
            raw = read_backup_file(self.path)
        except FileNotFoundError:
            health.status, health.detail = BackupStatus.MISSING, f"{self.path} is missing"
            return
        except OSError as exc:  # BackupFileError included: too large, not a regular file
            health.status = BackupStatus.CORRUPT
            health.detail = f"{self.path} is unreadable: {exc.strerror or exc}"
            return
        try:
            parsed = self.parse_for_opening(raw)
        except errors.BackupInvalid as exc:
            health.status, health.detail = BackupStatus.CORRUPT, str(exc)
            return
        if keyring.active_generation is None:
            self.mark_ok("structure ok (sealed: keys not checked)", now=now)
        elif parsed.matches(keyring.fingerprints()):
            self.mark_ok(now=now)
        else:
            health.status = BackupStatus.MISMATCH
            health.detail = (f"backup holds generations {list(parsed.generations)}, "
                             f"memory holds {list(keyring.generations)}")

    def confirm_matches(self, fingerprints: Mapping[int, bytes], keyring: Keyring) -> None:
        """After a password opened the file: its keys must be exactly those in memory."""
        if set(fingerprints) != set(keyring.generations) or not all(
            fingerprints_equal(fp, keyring.fingerprint_for(g)) for g, fp in fingerprints.items()
        ):
            self.health.status = BackupStatus.MISMATCH
            raise errors.BackupInvalid("the backup does not match the keys in memory")
        self.mark_ok()
