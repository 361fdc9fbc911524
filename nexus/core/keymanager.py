"""The root key's lifecycle: UNINITIALIZED -> UNSEALED -> (restart) SEALED -> UNSEALED.

The key manager is the lifecycle state machine. It owns the keyring (root keys by generation,
in wipeable, mlock'ed buffers): an immutable value swapped under a lock, so readers never see a
half-built one. It leans on two parts:

- the backup (:class:`nexus.backup.keeper.BackupKeeper`): the password-sealed file, its health,
  and the one way to open it with the password;
- the generation ledger (:class:`nexus.core.ledger.GenerationLedger`): the authenticated record
  of generations in the store, against which every recovered key is checked, so a foreign
  backup, a wrong key or a planted one is never installed.

Every password attempt runs under the lifecycle lock, one at a time, behind a growing backoff
(:class:`nexus.core.attempts.PasswordAttempts`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from nexus.backup.format import Backup, create_backup_with_record_key
from nexus.backup.keeper import BackupHealth, BackupKeeper
from nexus.core import errors, testpoints
from nexus.core.attempts import WRONG_PASSWORD_DELAY_CAP, PasswordAttempts
from nexus.core.ledger import GenerationInfo, GenerationLedger, Wrapped, held_fingerprints
from nexus.core.password_policy import PasswordRejected, check_password
from nexus.crypto.kdf import KdfParams
from nexus.crypto.keyring import Keyring
from nexus.crypto.keys import fingerprint
from nexus.crypto.secret_buffer import SecretBuffer, SecretKey
from nexus.crypto.wrap import UnwrapError, unwrap_generation, wrap_generation
from nexus.store.base import Store
from spike.errors import ErrorKind
from spike.memory import wipe_bytearray
from spike.states import LifecycleState

log = structlog.get_logger("nexus.keys")


@dataclass(frozen=True)
class Recovery:
    """What a successful recover did (for the answer and the audit trail)."""

    keyring: Keyring
    old_password_accepted: bool = False
    retired_generations: tuple[int, ...] = ()
    # Records from before authenticated records, vouched for by the password and tagged now
    # (only with the operator's --authenticate-legacy-records).
    legacy_records_authenticated: bool = False
    # The server's file was lost: the store's copy of the backup opened (and is the file now).
    from_store_copy: bool = False


_EARLIER_KEY_REFUSED = (
    "this backup is sealed under an earlier administrator password (it was made before a "
    "password change): recovering from it would seal the server's backup under that old "
    "password again. Use a newer copy, or confirm with `spike recover --accept-old-password` "
    "and then run `spike password change`"
)


@dataclass(frozen=True)
class Followed:
    """What :meth:`KeyManager.follow` did: generations taken in and forgotten, and whether
    the store records a newer generation that this node could not take (``behind``)."""

    added: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    behind: bool = False


class KeyManager:
    def __init__(
        self,
        store: Store,
        backup_path: Path,
        kdf_params: KdfParams,
        *,
        allow_insecure_kdf: bool = False,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        clock: Callable[[], float] = time.time,
        wrong_password_delay_cap: float = WRONG_PASSWORD_DELAY_CAP,
        authenticate_legacy_records: bool = False,
    ) -> None:
        self._store = store
        self._kdf_params = kdf_params
        self._clock = clock
        self._lock = threading.RLock()  # serializes lifecycle changes
        self._keyring = Keyring.empty()
        self._backup = BackupKeeper(backup_path, kdf_params,
                                    allow_insecure_kdf=allow_insecure_kdf, clock=clock)
        self._ledger = GenerationLedger(store, clock,
                                        authenticate_legacy_records=authenticate_legacy_records)
        self._attempts = PasswordAttempts(backoff_base, backoff_cap,
                                          delay_cap=wrong_password_delay_cap)
        self._unseal_listeners: list[Callable[[], None]] = []
        self._change_listeners: list[Callable[[], None]] = []
        self._pending_generation = 0

    # ------------------------------------------------------------------ state

    @property
    def keyring(self) -> Keyring:
        """The current keyring value (immutable; grab it once per operation)."""
        return self._keyring

    @property
    def recover_failures(self) -> int:
        """Wrong passwords since start-up (recover, verify and password change alike)."""
        return self._attempts.wrong_passwords

    @property
    def backup_path(self) -> Path:
        return self._backup.path

    @property
    def backup_health(self) -> BackupHealth:
        return self._backup.health

    @property
    def state(self) -> LifecycleState:
        if self._keyring.active_generation is not None:
            return LifecycleState.UNSEALED
        if self._backup.path.exists() or self.generations_recorded():
            return LifecycleState.SEALED
        return LifecycleState.UNINITIALIZED

    def is_unsealed(self) -> bool:
        return self._keyring.active_generation is not None

    def sealed_message(self) -> tuple[LifecycleState, str]:
        state = self.state
        if state == LifecycleState.UNINITIALIZED:
            return state, "Nexus is not initialized: run `spike init`"
        if not self._backup.path.exists():
            if self._ledger.backup_copy() is not None:
                return LifecycleState.SEALED, (
                    "Nexus is sealed and its backup file is missing: run `spike recover` "
                    "(the store keeps a copy of the backup, which restores the file)")
            return LifecycleState.SEALED, (
                "Nexus is sealed and its backup file is missing: run `spike recover "
                "--backup-file EXPORTED_COPY`"
            )
        return (LifecycleState.SEALED,
                "Nexus is sealed: run `spike recover` with the administrator password")

    def on_unsealed(self, listener: Callable[[], None]) -> None:
        self._unseal_listeners.append(listener)

    def on_keys_changed(self, listener: Callable[[], None]) -> None:
        """``listener()`` after a generation was added, activated, dropped or followed."""
        self._change_listeners.append(listener)

    def _notify_changed(self) -> None:
        for listener in self._change_listeners:
            try:
                listener()
            except Exception:
                log.exception("key change listener failed")

    def require_unsealed(self) -> Keyring:
        keyring = self._keyring
        if keyring.active_generation is None:
            state, message = self.sealed_message()
            raise errors.NotReady(ErrorKind(state.value), message)
        return keyring

    def generations_recorded(self) -> dict[int, GenerationInfo]:
        """The generations this Nexus created and still uses (retired ones left out)."""
        return self._ledger.recorded()

    def generations_retired(self) -> dict[int, str]:
        """Generations this Nexus created and retired: generation -> fingerprint hex."""
        return self._ledger.retired()

    def _holding(self) -> dict[int, str]:
        """Generation -> fingerprint hex of every key in memory (what the ledger may tag)."""
        keyring = self._keyring
        return {g: keyring.entry(g).fingerprint_hex for g in keyring.generations}

    def _notify_unsealed(self) -> None:
        for listener in self._unseal_listeners:
            try:
                listener()
            except Exception:
                log.exception("unseal listener failed")

    # ------------------------------------------------------------------ init

    def init(self, password: bytes) -> GenerationInfo:
        with self._lock:
            if self.state != LifecycleState.UNINITIALIZED:
                raise errors.AlreadyInitialized(
                    "Nexus is already initialized; after a restart use `spike recover`"
                )
            if not self._store.is_empty():
                raise errors.AlreadyInitialized(
                    "the store already holds records but no root key is known: recover "
                    "from the backup instead of initializing a new key"
                )
            key = SecretKey.generate()
            try:
                backup, record_key = self._new_backup(password, {1: key})
            except BaseException:
                key.wipe()
                raise
            info = GenerationInfo(1, fingerprint(key).hex(), self._clock())
            self._write_backup(backup)
            self._ledger.set_record_key(record_key, backup.public_key.digest_hex)
            self._ledger.record({1: info}, holding={1: info.fingerprint})
            self._ledger.record_backup_key(backup.public_key.digest_hex)
            self._backup.current = backup
            self._keyring = Keyring.from_keys({1: key}, active=1)
        log.info("root key generated", generation=1, fingerprint=info.fingerprint)
        self._notify_unsealed()
        return info

    def _new_backup(self, password: bytes,
                    keys: dict[int, SecretKey]) -> tuple[Backup, SecretBuffer]:
        """A backup of ``keys`` under a new password (checked against the policy)."""
        try:
            pw = check_password(password)
        except PasswordRejected as exc:
            raise errors.PasswordRejected(str(exc)) from None
        try:
            backup, _, record_key = create_backup_with_record_key(pw, keys, self._kdf_params)
        finally:
            wipe_bytearray(pw)
        return backup, record_key

    # ------------------------------------------------------------------ passwords

    def _open(self, backup: Backup, password: bytes,
              subject: str) -> tuple[dict[int, SecretKey], SecretBuffer]:
        """Open ``backup`` with ``password``; a wrong one counts against the backoff."""
        return self._backup.open(backup, password, subject=subject,
                                 on_wrong_password=self._attempts.failed)

    # ------------------------------------------------------------------ recover

    def recover(self, password: bytes, exported: bytes = b"", *,
                accept_old_password: bool = False) -> Keyring:
        return self.recover_detailed(password, exported,
                                     accept_old_password=accept_old_password).keyring

    def recover_detailed(self, password: bytes, exported: bytes = b"", *,
                         accept_old_password: bool = False) -> Recovery:
        """Unseal from the server's backup file or an exported copy (``exported``).

        A backup sealed under an earlier password (made before a password change) is refused
        with :class:`errors.OldPasswordBackup` unless ``accept_old_password``: recovering from
        it seals the server's backup under that old password again.
        """
        try:
            return self._recover(password, exported, accept_old_password)
        except errors.WrongPassword:
            self._attempts.wait_out()
            raise

    def _recover(self, password: bytes, exported: bytes, accept_old_password: bool) -> Recovery:
        # An exported copy is parsed and its KDF costs bounded before the lifecycle lock is
        # taken: a hostile copy is refused as invalid at once, costs no Argon2 run, holds
        # nobody up and does not count as a wrong password.
        early = self._backup.parse_for_opening(exported) if exported else None
        with self._lock:
            if self.is_unsealed():
                raise errors.AlreadyUnsealed("Nexus is already unsealed: nothing to do")
            self._attempts.check()
            backup, raw = (early, exported) if early is not None else self._backup_to_open(b"")
            keys, record_key = self._open(backup, password, "this backup")
            try:
                recovery = self._check_recovered(backup, keys, record_key, accept_old_password)
            except BaseException:
                for key in keys.values():
                    key.wipe()
                record_key.wipe()
                raise
            self._attempts.succeeded()
            from_copy = not exported and self._backup.file_bytes() != raw
            self._install(backup, keys, record_key, recovery,
                          restore=self._backup.file_bytes() != raw)
            recovery = replace(recovery, keyring=self._keyring, from_store_copy=from_copy)
        _log_recovery(recovery)
        self._notify_unsealed()
        return recovery

    def _check_recovered(self, backup: Backup, keys: dict[int, SecretKey],
                         record_key: SecretBuffer, accept_old_password: bool) -> Recovery:
        """Drop the retired generations from ``keys`` (wiped) and prove the rest are this
        Nexus's, authenticated under the password that opened the backup. Raises if not."""
        retired = self._ledger.split_retired(keys)
        for generation in retired:
            keys.pop(generation).wipe()
        self._ledger.check_keys(keys)
        key_id = backup.public_key.digest_hex
        legacy = self._ledger.check_tags(keys, record_key, key_id)
        # After the password opened it and its keys proved to be ours: so the backup is
        # genuine and sealed under another password than the recorded one.
        old_password = self._ledger.sealed_under_an_earlier_password(key_id)
        if old_password and not accept_old_password:
            raise errors.OldPasswordBackup(_EARLIER_KEY_REFUSED)
        return Recovery(Keyring.empty(), old_password_accepted=old_password,  # keyring: later
                        retired_generations=tuple(retired),
                        legacy_records_authenticated=legacy)

    def _install(self, backup: Backup, keys: dict[int, SecretKey], record_key: SecretBuffer,
                 checked: Recovery, *, restore: bool) -> None:
        """Take the recovered keys into memory: tag and complete the records, make the
        server's file hold exactly these keys, record the password-key."""
        key_id = backup.public_key.digest_hex
        self._ledger.set_record_key(record_key, key_id)
        holding = held_fingerprints(keys)
        if checked.legacy_records_authenticated:
            self._ledger.record({g: info for g, info in self.generations_recorded().items()
                                 if g in keys}, holding=holding)
        if not self._ledger.records():
            now = self._clock()
            self._ledger.record({g: GenerationInfo(g, fp, now) for g, fp in holding.items()},
                                holding=holding)
        if checked.retired_generations:
            # Keep only what is in use: the same password-key, without the retired keys.
            backup = backup.reseal(keys)
            restore = not self._backup.holds(backup)
        if restore:
            # The server's copy is lost or differs: restore the one that opened.
            self._backup.set_aside_unusable(keys)
            self._write_backup(backup)
        known = self._ledger.backup_keys()
        if checked.old_password_accepted or not known or known.get("pending") == key_id:
            # From now on the backup is sealed to this key (the operator consented), or a
            # password change was written but not yet recorded (a crash): finish it.
            self._ledger.record_backup_key(key_id)
        self._backup.current = backup
        self._keyring = Keyring.from_keys(keys, active=max(keys))
        self._backup.mark_ok()

    # ------------------------------------------------------------------ backup

    def _write_backup(self, backup: Backup) -> None:
        """The server's file first (written and read back), then the store's copy of
        record: a crash between the two leaves the file, which recovery prefers, newer."""
        self._backup.write(backup)
        self._ledger.record_backup_copy(backup.to_bytes())

    def _backup_to_open(self, exported: bytes) -> tuple[Backup, bytes]:
        """The backup a recovery opens: an exported copy, else the server's file, else (the
        file lost) the store's copy of record, which recovery then writes back as the file."""
        if exported:
            return self._backup.parse_for_opening(exported), exported
        raw = self._backup.file_bytes()
        if raw is None:
            raw = self._ledger.backup_copy()
            if raw is not None:
                log.warning("the backup file is missing or unreadable: recovering from the "
                            "store's copy of the backup", file=str(self._backup.path))
        if raw is None:
            raise errors.BackupInvalid(
                f"the backup file {self._backup.path} is missing or unreadable and the store "
                "keeps no copy: run `spike recover --backup-file EXPORTED_COPY`")
        return self._backup.parse_for_opening(raw), raw

    def backup_generations(self) -> tuple[int, ...]:
        return self._backup.generations()

    def kdf_description(self) -> str:
        return self._backup.kdf_description()

    def backup_file_changed(self) -> bool:
        """True when the file was deleted, replaced or modified since it was last checked."""
        return self._backup.file_changed()

    def verify_backup_file(self) -> BackupHealth:
        """Check the file's structure and that it matches the keys in memory (no password)."""
        return self._backup.verify(self._keyring)

    def verify_with_password(self, password: bytes) -> tuple[int, ...]:
        """Prove that ``password`` opens the backup and that it matches memory.

        Every password attempt runs under the lifecycle lock, one at a time, so that
        concurrent guesses cannot slip past the backoff (nor run many 64 MiB KDFs).
        """
        try:
            with self._lock:
                return self._verify_with_password(password)
        except errors.WrongPassword:
            self._attempts.wait_out()
            raise

    def _verify_with_password(self, password: bytes) -> tuple[int, ...]:
        keyring = self.require_unsealed()
        self._attempts.check()
        backup, _ = self._backup.load_server_file(
            f"the backup file {self._backup.path} is missing")
        keys, record_key = self._open(backup, password, "the backup")
        record_key.wipe()
        try:
            fps = {g: fingerprint(k) for g, k in keys.items()}
        finally:
            for key in keys.values():
                key.wipe()
        self._attempts.succeeded()
        self._backup.confirm_matches(fps, keyring)
        return tuple(sorted(fps))

    def export_backup(self) -> tuple[bytes, tuple[int, ...]]:
        self.require_unsealed()
        return self._backup.export()

    def change_password(self, old: bytes, new: bytes) -> tuple[int, ...]:
        try:
            return self._change_password(old, new)
        except errors.WrongPassword:
            self._attempts.wait_out()
            raise

    def _change_password(self, old: bytes, new: bytes) -> tuple[int, ...]:
        with self._lock:
            keyring = self.require_unsealed()
            self._verify_with_password(old)
            backup, record_key = self._new_backup(new, keyring.keys())
            new_id = backup.public_key.digest_hex
            # "pending" first: a crash between the write and the record leaves a file
            # that recovery still accepts without --accept-old-password. The records get
            # their tags under the new password before the new file exists, and keep the
            # old ones (copies sealed under the old password still recover).
            current = self._backup.current.public_key.digest_hex if self._backup.current else ""
            self._ledger.record_backup_key(current or new_id, pending=new_id)
            self._ledger.set_record_key(record_key, new_id)
            self._ledger.record(self._ledger.live_records(keyring), holding=self._holding())
            self._write_backup(backup)
            self._ledger.record_backup_key(new_id)
            self._backup.current = backup
            return backup.generations

    # ------------------------------------------------------------------ rotation support

    def next_generation(self) -> int:
        """The number the next root key gets. Never reused, even after an aborted rotation
        dropped it: an old export holding that number must never pass for the current key."""
        keyring = self.require_unsealed()
        return max(max(keyring.generations), self._ledger.high_water()) + 1

    def add_generation(self) -> GenerationInfo:
        """Generate RK(g+1) and seal it into the backup *before* it is used; activate it."""
        with self._lock:
            keyring = self.require_unsealed()
            assert self._backup.current is not None
            new_generation = self.next_generation()
            self._ledger.raise_high_water(new_generation)
            key = SecretKey.generate()
            try:
                testpoints.reached(testpoints.Point.NEW_KEY_GENERATED)
                info = GenerationInfo(new_generation, fingerprint(key).hex(), self._clock())
                # Recorded *before* the backup holds it: recovery accepts only generations
                # this Nexus recorded, so a key sealed into the backup by anyone else
                # (the public key is in the file) is refused. Entries for keys that never
                # made it into memory (an earlier crash) are dropped here.
                recorded = {g: i for g, i in self.generations_recorded().items()
                            if g in keyring.generations}
                recorded[new_generation] = info
                self._pending_generation = new_generation
                holding = self._holding()
                holding[new_generation] = info.fingerprint
                # The keyring of record: the new key wrapped under the active one, in the
                # same write that makes it known, so every node holding that one follows.
                parent = keyring.entry(keyring.active_generation or max(keyring.generations))
                wrapped = Wrapped(parent.generation,
                                  wrap_generation(parent, new_generation, key))
                self._ledger.record(recorded, holding=holding,
                                    wraps={new_generation: wrapped})
                keys = dict(keyring.keys())
                keys[new_generation] = key
                backup = self._backup.current.reseal(keys)
                self._write_backup(backup)
            except BaseException:
                key.wipe()
                raise
            testpoints.reached(testpoints.Point.BACKUP_UPDATED)
            self._backup.current = backup
            self._keyring = keyring.with_key(new_generation, key, activate=True)
        log.info("root key generation added", generation=new_generation,
                 fingerprint=info.fingerprint)
        self._notify_changed()
        return info

    # ------------------------------------------------------------------ following the store

    def follow(self) -> Followed:
        """Catch up with the keyring of record (other nodes sharing the store rotate too).

        Takes into memory every recorded generation this node lacks whose wrap opens under a
        generation it holds (the wrap's AEAD proves a holder of that key made it; the
        unwrapped key must have the recorded fingerprint), then forgets the generations the
        ledger retired, and keeps the backup file a copy of the store's backup. Nothing here
        needs the password. A node that holds no parent of a new generation stays as it is
        (it needs a peer or the password: :attr:`Followed.behind`).
        """
        with self._lock:
            keyring = self.require_unsealed()
            added = self._take_wrapped(keyring)
            dropped = self._forget_retired()
            self._copy_backup_of_record()
        for generation in added:
            log.info("root key generation taken from the keyring of record",
                     generation=generation)
        for generation in dropped:
            log.info("root key generation retired by another node: forgotten",
                     generation=generation)
        if added or dropped:
            self._notify_changed()
        latest = max(self._ledger.recorded(), default=0)
        return Followed(tuple(added), tuple(dropped),
                        behind=latest not in self._keyring.generations and latest > 0)

    def _take_wrapped(self, keyring: Keyring) -> list[int]:
        added: list[int] = []
        for generation, info in sorted(self._ledger.recorded().items()):
            if generation in keyring.generations:
                continue
            wrapped = self._ledger.wrapped(generation)
            if wrapped is None or wrapped.parent not in keyring.generations:
                continue
            try:
                key = unwrap_generation(keyring.entry(wrapped.parent), generation,
                                        bytes.fromhex(info.fingerprint), wrapped.blob)
            except UnwrapError as exc:
                log.error("a wrapped root key in the store was refused", reason=str(exc))
                continue
            try:
                testpoints.reached(testpoints.Point.KEYRING_FOLLOW)
                newest = generation > (keyring.active_generation or 0)
                keyring = keyring.with_key(generation, key, activate=newest)
            except BaseException:
                key.wipe()
                raise
            added.append(generation)
        self._keyring = keyring
        return added

    def _forget_retired(self) -> list[int]:
        keyring, retired = self._keyring, self._ledger.retired()
        dropped = [g for g in keyring.generations
                   if g in retired and g != keyring.active_generation]
        for generation in dropped:
            entry = keyring.entry(generation)
            keyring = keyring.without(generation)
            entry.wipe()
        self._keyring = keyring
        return dropped

    def _copy_backup_of_record(self) -> None:
        """Make the server's file the store's backup when that one holds exactly the keys in
        memory (a copy: the file is written, read back and checked, no password involved)."""
        raw = self._ledger.backup_copy()
        if raw is None or raw == self._backup.file_bytes():
            return
        try:
            backup = self._backup.parse(raw)
        except errors.BackupInvalid as exc:
            log.warning("the store's copy of the backup is unusable; not copied", reason=str(exc))
            return
        if not backup.matches(self._keyring.fingerprints()):
            return  # written mid-change by another node, or older than memory: next time
        self._backup.write(backup)
        self._backup.current = backup

    def assert_current(self, keyring: Keyring) -> None:
        """Refuse to encrypt when another node sharing the store has a newer root key.

        Several Nexus nodes may share one PostgreSQL store. If another node rotated,
        writing under our older generation would put data under a key that node is
        about to drop. The recorded generations are re-read at most once a second.
        """
        latest = self._ledger.latest()
        if latest == self._pending_generation:
            return  # our own new key, recorded a moment before it enters the keyring
        if latest > (keyring.active_generation or 0) and latest not in keyring.generations:
            raise errors.NotReady(
                ErrorKind.STALE,
                f"another Nexus node rotated the root key to generation {latest}: run "
                "`spike recover` on this node with the current backup",
            )

    def ensure_recorded(self) -> None:
        """Record the fingerprint of every generation in memory (after a crash mid-change)."""
        with self._lock:
            keyring = self.require_unsealed()
            recorded = self.generations_recorded()
            missing = [g for g in keyring.generations if g not in recorded]
            for g in missing:
                recorded[g] = GenerationInfo(g, keyring.entry(g).fingerprint_hex, self._clock())
            if missing:
                self._ledger.record(recorded, holding=self._holding())

    def activate(self, generation: int) -> None:
        with self._lock:
            self._keyring = self.require_unsealed().with_active(generation)
        self._notify_changed()

    def drop_generation(self, generation: int) -> None:
        """Remove a generation from the backup first, then from memory (wiped)."""
        with self._lock:
            keyring = self.require_unsealed()
            assert self._backup.current is not None
            if generation not in keyring.generations:
                return
            remaining = keyring.without(generation)
            backup = self._backup.current.reseal(remaining.keys())
            self._write_backup(backup)
            testpoints.reached(testpoints.Point.GENERATION_DROPPED_FROM_BACKUP)
            self._backup.current = backup
            old_entry = keyring.entry(generation)
            self._keyring = remaining
            recorded = self.generations_recorded()
            recorded.pop(generation, None)
            # Remembered as retired: a backup made before this (the .prev copy, an older
            # export) still holds it, and must still recover (the retired key is ignored).
            self._ledger.record(recorded, holding=self._holding(),
                                retire={generation: old_entry.fingerprint_hex})
        old_entry.wipe()
        log.info("root key generation dropped", generation=generation)
        self._notify_changed()

    # ------------------------------------------------------------------ shutdown

    def seal(self) -> None:
        """Wipe every root key from memory (shutdown)."""
        self._attempts.close()
        with self._lock:
            keyring = self._keyring
            self._keyring = Keyring.empty()
            record_key = self._ledger.take_record_key()
        keyring.wipe()
        if record_key is not None:
            record_key.wipe()


def _log_recovery(recovery: Recovery) -> None:
    keyring = recovery.keyring
    if recovery.retired_generations:
        log.warning("the backup held retired generations: ignored",
                    retired=list(recovery.retired_generations))
    if recovery.old_password_accepted:
        log.warning("recovered from a backup sealed under an earlier password, as the "
                    "operator confirmed: the backup is sealed under that password again",
                    generations=list(keyring.generations))
    log.info("unsealed", generations=list(keyring.generations),
             active=keyring.active_generation)
