"""The root key's lifecycle: UNINITIALIZED -> UNSEALED -> (restart) SEALED -> UNSEALED.

The key manager owns the keyring (root keys by generation, in wipeable,
mlock'ed buffers) and the password-sealed backup. The keyring is an immutable
value swapped under a lock, so readers never see a half-built one. Only the
backup's *public* key stays in memory after init/recover, which lets Nexus
re-seal the backup after each rotation without the password.

Durable facts kept in the store (never the key): each generation's
fingerprint and creation time (state key ``root_keys``). After recovery every
fingerprint is checked against them, so a foreign backup or a wrong key can
never be installed silently.

Each live record carries HMAC tags (``tags``: password-key digest -> tag) under
the *record key*, derived from the password with the backup key pair
(:func:`nexus.crypto.backup_format.record_tag`). Recovery loads a generation
only when its record has a valid tag under the password that opened the backup,
so whoever can write the database and the backup file but does not know the
password cannot plant a key (sealing one to the backup's public key needs no
password). The record key stays in memory while unsealed, so a rotation tags
the record of its new key; Nexus tags only records of keys it holds. Retired
generations are kept (``retired``) so that older backups still recover.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from nexus.core import errors, testpoints
from nexus.core.backup_file import BackupFileError, read_backup_file, write_backup_file
from nexus.core.integrity import needed_generations
from nexus.core.password_policy import PasswordRejected, check_password, normalize_password
from nexus.crypto.backup_format import (
    Backup,
    BackupCorrupt,
    BackupVersionUnsupported,
    WrongPassword,
    check_kdf_bound,
    create_backup_with_record_key,
    open_backup,
    open_backup_with_record_key,
    record_tag,
    record_tag_valid,
)
from nexus.crypto.kdf import KdfBound, KdfParams
from nexus.crypto.keyring import Keyring
from nexus.crypto.keys import fingerprint, fingerprints_equal
from nexus.crypto.secret_buffer import SecretBuffer, SecretKey
from nexus.store.base import Store
from spike.memory import wipe_bytearray

log = structlog.get_logger("nexus.keys")

ROOT_KEYS_STATE = "root_keys"
# Which password-key the backup is sealed to (SHA-256 of the backup's public key): "current",
# and "pending" while a password change is being written. A backup sealed to another key was
# made under an earlier password; recovering from it needs the operator's explicit consent.
BACKUP_KEY_STATE = "backup_public_key"
HIGH_WATER_STATE = "root_key_generation_high_water"
MAX_RETIRED = 256  # retired generations remembered (as many as a backup can hold)
MAX_RECORD_TAGS = 4  # tags per record: the current password-key and the ones before it


@dataclass(frozen=True)
class GenerationInfo:
    generation: int
    fingerprint: str  # hex
    created: float


@dataclass(frozen=True)
class Recovery:
    """What a successful recover did (for the answer and the audit trail)."""

    keyring: Keyring
    old_password_accepted: bool = False
    retired_generations: tuple[int, ...] = ()
    # Records from before authenticated records, vouched for by the password and tagged now
    # (only with the operator's --authenticate-legacy-records).
    legacy_records_authenticated: bool = False


@dataclass
class BackupHealth:
    status: str = "unknown"  # ok | missing | corrupt | mismatch | unknown
    detail: str = ""
    last_written: float | None = None
    last_verified: float | None = None


class Backoff:
    """A growing delay after failed password attempts (per Nexus)."""

    def __init__(self, base: float, cap: float, clock: Callable[[], float]) -> None:
        self._base = base
        self._cap = cap
        self._clock = clock
        self.failures = 0
        self._not_before = 0.0

    def check(self) -> None:
        remaining = self._not_before - self._clock()
        if remaining > 0:
            raise errors.TooManyAttempts(remaining)

    def failed(self) -> float:
        self.failures += 1
        delay = float(min(self._cap, self._base * (2 ** (self.failures - 1))))
        self._not_before = self._clock() + delay
        return delay

    def remaining(self) -> float:
        return max(0.0, self._not_before - self._clock())

    def succeeded(self) -> None:
        self.failures = 0
        self._not_before = 0.0


def _password_bytes(raw: bytes) -> bytearray:
    """Copy the request's password into a wipeable buffer, NFKC-normalised like at init."""
    try:
        return bytearray(normalize_password(raw).encode("utf-8"))
    except PasswordRejected as exc:
        raise errors.WrongPassword("the password does not open the backup") from exc


# How long a wrong-password answer may be held back (the backoff is served in the answer, see
# KeyManager._wait_out_backoff). Below Pilot's 120 s deadline for password calls.
WRONG_PASSWORD_DELAY_CAP = 30.0


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
        # The operator's one-time upgrade consent: records with no tag at all (written before
        # records were authenticated) are accepted once the password opened the backup and
        # its keys match them, and are tagged then.
        self._authenticate_legacy = authenticate_legacy_records
        self._backup_path = backup_path
        self._kdf_params = kdf_params
        # The costliest Argon2id a backup may ask of us (checked before any KDF run).
        self._kdf_bound = KdfBound.for_configured(kdf_params)
        self._allow_insecure_kdf = allow_insecure_kdf
        self._clock = clock
        self._lock = threading.RLock()  # serializes lifecycle changes
        self._keyring = Keyring.empty()
        self._backup: Backup | None = None
        self._backoff = Backoff(backoff_base, backoff_cap, time.monotonic)
        self._wrong_password_delay_cap = wrong_password_delay_cap
        self._closing = threading.Event()  # wakes a held-back answer at shutdown
        # The record key of the backup's password (see backup_format.record_tag) and the
        # password-key it belongs to: set at init, recover and password change, wiped at seal.
        self._record_key: SecretBuffer | None = None
        self._record_key_id = ""
        self.backup_health = BackupHealth()
        self.recover_failures = 0
        self._unseal_listeners: list[Callable[[], None]] = []
        self._latest_recorded = 0
        self._latest_checked = -1e9
        self._pending_generation = 0
        self._health_lock = threading.Lock()
        # The file's identity (inode, size, times) when it was last checked: status re-checks
        # a file that changed since, so it never reports a deleted file as "ok".
        self._verified_signature: tuple[int, int, int, int] | None = None
        if backup_path.exists():
            self.backup_health.last_written = backup_path.stat().st_mtime
        self.backup_health.status = "unknown" if backup_path.exists() else "missing"

    # ------------------------------------------------------------------ state

    @property
    def keyring(self) -> Keyring:
        """The current keyring value (immutable; grab it once per operation)."""
        return self._keyring

    @property
    def state(self) -> str:
        if self._keyring.active_generation is not None:
            return "unsealed"
        if self._backup_path.exists() or self.generations_recorded():
            return "sealed"
        return "uninitialized"

    def is_unsealed(self) -> bool:
        return self._keyring.active_generation is not None

    def sealed_message(self) -> tuple[str, str]:
        state = self.state
        if state == "uninitialized":
            return "uninitialized", "Nexus is not initialized: run `spike init`"
        if not self._backup_path.exists():
            return "sealed", (
                "Nexus is sealed and its backup file is missing: run `spike recover "
                "--backup-file EXPORTED_COPY`"
            )
        return "sealed", "Nexus is sealed: run `spike recover` with the administrator password"

    def on_unsealed(self, listener: Callable[[], None]) -> None:
        self._unseal_listeners.append(listener)

    def require_unsealed(self) -> Keyring:
        keyring = self._keyring
        if keyring.active_generation is None:
            kind, message = self.sealed_message()
            raise errors.NotReady(kind, message)
        return keyring

    def _generation_records(self) -> dict[str, dict[str, object]]:
        raw = self._store.get_state(ROOT_KEYS_STATE)
        if not raw:
            return {}
        doc: dict[str, dict[str, object]] = json.loads(raw)
        return doc

    def generations_recorded(self) -> dict[int, GenerationInfo]:
        """The generations this Nexus created and still uses (retired ones left out)."""
        return {
            int(g): GenerationInfo(int(g), str(v["fingerprint"]),
                                   float(v["created"]))  # type: ignore[arg-type]
            for g, v in self._generation_records().items() if "retired" not in v
        }

    def generations_retired(self) -> dict[int, str]:
        """Generations this Nexus created and retired (dropped after a rotation): generation
        -> fingerprint hex. A backup made before the rotation still holds them."""
        return {int(g): str(v["fingerprint"])
                for g, v in self._generation_records().items() if "retired" in v}

    def _record_generations(self, infos: dict[int, GenerationInfo],
                            retire: dict[int, str] | None = None,
                            holding: dict[int, str] | None = None) -> None:
        """Write the live generations ``infos``; retired entries are kept (the newest
        MAX_RETIRED), plus ``retire`` (generation -> fingerprint hex) newly retired now.

        Each live record keeps the tags it has for the same fingerprint, and gets a tag under
        the record key in memory only when this Nexus *holds* that key (``holding``,
        generation -> fingerprint hex; by default the keyring): Nexus never vouches for a
        record it merely read from the store.
        """
        old = self._generation_records()
        retired = {g: v for g, v in old.items() if "retired" in v and int(g) not in infos}
        now = self._clock()
        for g, fp in (retire or {}).items():
            if g not in infos:
                retired[str(g)] = {"fingerprint": fp, "retired": now}
        newest = sorted(retired, key=int)[-MAX_RETIRED:]
        doc: dict[str, dict[str, object]] = {g: retired[g] for g in newest}
        if holding is None:
            keyring = self._keyring
            holding = {g: keyring.entry(g).fingerprint_hex for g in keyring.generations}
        for g, info in sorted(infos.items()):
            entry: dict[str, object] = {"fingerprint": info.fingerprint, "created": info.created}
            before = old.get(str(g), {})
            kept = before.get("tags")
            tags: dict[str, str] = {}
            if before.get("fingerprint") == info.fingerprint and isinstance(kept, dict):
                tags = {k: v for k, v in kept.items() if isinstance(k, str) and isinstance(v, str)}
            if (self._record_key is not None and holding.get(g) == info.fingerprint):
                tags.pop(self._record_key_id, None)
                tags[self._record_key_id] = record_tag(self._record_key, g,
                                                       bytes.fromhex(info.fingerprint))
            if tags:
                entry["tags"] = dict(list(tags.items())[-MAX_RECORD_TAGS:])
            doc[str(g)] = entry
        self._store.put_state(ROOT_KEYS_STATE, json.dumps(doc, sort_keys=True))

    def _live_records(self, keyring: Keyring) -> dict[int, GenerationInfo]:
        """The recorded generations held in ``keyring`` (filling in any missing record)."""
        recorded = self.generations_recorded()
        return {g: recorded.get(g) or GenerationInfo(g, keyring.entry(g).fingerprint_hex,
                                                     self._clock())
                for g in keyring.generations}

    def _set_record_key(self, record_key: SecretBuffer, key_id: str) -> None:
        previous = self._record_key
        self._record_key, self._record_key_id = record_key, key_id
        if previous is not None and previous is not record_key:
            previous.wipe()

    def _check_record_tags(self, keys: dict[int, SecretKey], record_key: SecretBuffer,
                           key_id: str) -> bool:
        """Every recorded generation about to be loaded must carry a valid tag under the
        record key of the password that opened the backup (a planted record cannot).

        True when the records predate authentication and the operator started Nexus with
        ``--authenticate-legacy-records``: they are accepted (the caller tags them)."""
        raw = self._generation_records()
        if not raw and self._store.is_empty():
            # An init that died between writing the backup and recording its key: nothing
            # is stored under any key yet. The records are written (and tagged) now.
            log.warning("no generation records and an empty store: accepting the backup's "
                        "keys and recording them", generations=sorted(keys))
            return False
        live = [v for v in raw.values() if isinstance(v, dict) and "retired" not in v]
        if live and not any(v.get("tags") for v in live):
            if self._authenticate_legacy:
                log.warning("generation records predate authentication: accepted on the "
                            "operator's --authenticate-legacy-records and tagged now",
                            generations=sorted(keys))
                return True
            raise errors.BackupInvalid(
                "the store's generation records predate authenticated records: to upgrade, "
                "start Nexus once with --authenticate-legacy-records and recover with the "
                "administrator password (only if nobody else could have written the store "
                "and the backup file)")
        for generation in sorted(keys):
            entry = raw.get(str(generation), {})
            tags = entry.get("tags")
            tag = tags.get(key_id) if isinstance(tags, dict) else None
            fp = fingerprint(keys[generation])
            if not record_tag_valid(record_key, generation, fp, tag):
                raise errors.BackupInvalid(
                    f"the record of generation {generation} is not authenticated under this "
                    "backup's password: refusing a key that may have been planted (or the "
                    "store's records predate authenticated records, or the password was "
                    f"changed more than {MAX_RECORD_TAGS - 1} times since this backup)"
                )
        return False

    # ------------------------------------------------------------------ init

    def init(self, password: bytes) -> GenerationInfo:
        with self._lock:
            if self.state != "uninitialized":
                raise errors.AlreadyInitialized(
                    "Nexus is already initialized; after a restart use `spike recover`"
                )
            if not self._store.is_empty():
                raise errors.AlreadyInitialized(
                    "the store already holds records but no root key is known: recover "
                    "from the backup instead of initializing a new key"
                )
            try:
                pw = check_password(password)
            except PasswordRejected as exc:
                raise errors.PasswordRejected(str(exc)) from None
            key = SecretKey.generate()
            try:
                backup, _, record_key = create_backup_with_record_key(pw, {1: key},
                                                                      self._kdf_params)
            except BaseException:
                key.wipe()
                raise
            finally:
                wipe_bytearray(pw)
            info = GenerationInfo(1, fingerprint(key).hex(), self._clock())
            self._write_backup(backup)
            self._set_record_key(record_key, backup.public_key.digest_hex)
            self._record_generations({1: info}, holding={1: info.fingerprint})
            self._record_backup_key(backup.public_key.digest_hex)
            self._backup = backup
            self._keyring = Keyring.from_keys({1: key}, active=1)
            self.backup_health.status = "ok"
            self.backup_health.detail = ""
            self.backup_health.last_verified = self._clock()
        log.info("root key generated", generation=1, fingerprint=info.fingerprint)
        self._notify_unsealed()
        return info

    # ------------------------------------------------------------------ recover

    def _wait_out_backoff(self) -> None:
        """Serve the backoff in the wrong-password answer, outside the lifecycle lock.

        The answer comes once the delay has passed (at most ``wrong_password_delay_cap``), so
        the next attempt - the right password right after a typo - is accepted at once, while
        concurrent guesses meanwhile are still refused (:class:`errors.TooManyAttempts`).
        """
        deadline = time.monotonic() + min(self._backoff.remaining(),
                                          self._wrong_password_delay_cap)
        while not self._closing.is_set():
            left = min(self._backoff.remaining(), deadline - time.monotonic())
            if left <= 0:
                return
            self._closing.wait(left)

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
            self._wait_out_backoff()
            raise

    # ------------------------------------------------------------------ password-key record

    def _backup_keys(self) -> dict[str, str]:
        raw = self._store.get_state(BACKUP_KEY_STATE)
        if not raw:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError:
            return {}
        if not isinstance(doc, dict):
            return {}
        return {k: v for k, v in doc.items() if k in ("current", "pending")
                and isinstance(v, str)}

    def _record_backup_key(self, current: str, pending: str = "") -> None:
        doc = {"current": current}
        if pending:
            doc["pending"] = pending
        self._store.put_state(BACKUP_KEY_STATE, json.dumps(doc, sort_keys=True))

    def _sealed_under_an_earlier_password(self, backup: Backup) -> bool:
        known = self._backup_keys()
        if not known:
            return False  # a Nexus from before this record: nothing to compare with
        return backup.public_key.digest_hex not in known.values()

    def _recover(self, password: bytes, exported: bytes, accept_old_password: bool) -> Recovery:
        # An exported copy is parsed and its KDF costs bounded before the lifecycle lock is
        # taken: a hostile copy is refused as invalid at once, costs no Argon2 run, holds
        # nobody up and does not count as a wrong password.
        early = self._parse_for_opening(exported) if exported else None
        with self._lock:
            if self.is_unsealed():
                raise errors.AlreadyUnsealed("Nexus is already unsealed: nothing to do")
            self._backoff.check()
            if early is not None:
                backup, raw = early, exported
            else:
                backup, raw = self._load_backup_for_recovery(exported)
            pw = _password_bytes(password)
            try:
                keys, record_key = open_backup_with_record_key(backup, pw, bound=self._kdf_bound)
            except WrongPassword:
                self._failed_attempt()
                raise errors.WrongPassword(
                    "the password does not open this backup"
                ) from None
            except BackupCorrupt as exc:
                raise errors.BackupInvalid(f"the backup is invalid: {exc}") from None
            finally:
                wipe_bytearray(pw)
            retired: list[int] = []
            try:
                retired = self._split_retired(keys)
                for generation in retired:
                    keys.pop(generation).wipe()
                self._check_against_store(keys)
                legacy = self._check_record_tags(keys, record_key,
                                                 backup.public_key.digest_hex)
                # After the password opened it and its keys proved to be ours: so the backup
                # is genuine and sealed under another password than the recorded one.
                old_password = self._sealed_under_an_earlier_password(backup)
                if old_password and not accept_old_password:
                    raise errors.OldPasswordBackup(
                        "this backup is sealed under an earlier administrator password (it "
                        "was made before a password change): recovering from it would seal "
                        "the server's backup under that old password again. Use a newer "
                        "copy, or confirm with `spike recover --accept-old-password` and "
                        "then run `spike password change`"
                    )
            except BaseException:
                for key in keys.values():
                    key.wipe()
                record_key.wipe()
                raise
            self._backoff.succeeded()
            self._set_record_key(record_key, backup.public_key.digest_hex)
            if legacy:
                self._record_generations(
                    {g: info for g, info in self.generations_recorded().items() if g in keys},
                    holding={g: fingerprint(k).hex() for g, k in keys.items()})
            if not self._generation_records():
                now = self._clock()
                self._record_generations(
                    {g: GenerationInfo(g, fingerprint(k).hex(), now) for g, k in keys.items()},
                    holding={g: fingerprint(k).hex() for g, k in keys.items()})
            if retired:
                # Keep only what is in use: the same password-key, without the retired keys.
                backup = backup.reseal(keys)
                if not self._server_file_holds(backup):
                    self._set_aside_unusable_file(keys)
                    self._write_backup(backup)
            elif exported and self._file_bytes() != raw:
                # The server's copy is lost or differs: restore the one that opened.
                self._set_aside_unusable_file(keys)
                self._write_backup(backup)
            if old_password or not self._backup_keys():
                # From now on the backup is sealed to this key (the operator consented).
                self._record_backup_key(backup.public_key.digest_hex)
            elif self._backup_keys().get("pending") == backup.public_key.digest_hex:
                # A password change was written but not yet recorded (a crash): finish it.
                self._record_backup_key(backup.public_key.digest_hex)
            self._backup = backup
            self._keyring = Keyring.from_keys(keys, active=max(keys))
            self.backup_health.status = "ok"
            self.backup_health.detail = ""
            self.backup_health.last_verified = self._clock()
            keyring = self._keyring
        if retired:
            log.warning("the backup held retired generations: ignored", retired=retired)
        if old_password:
            log.warning("recovered from a backup sealed under an earlier password, as the "
                        "operator confirmed: the backup is sealed under that password again",
                        generations=list(keys))
        log.info("unsealed", generations=list(keys), active=max(keys))
        self._notify_unsealed()
        return Recovery(keyring, old_password_accepted=old_password,
                        retired_generations=tuple(retired),
                        legacy_records_authenticated=legacy)

    def _server_file_holds(self, backup: Backup) -> bool:
        """True when the server's file is a good copy of exactly ``backup``'s keys, sealed to
        the same password-key (nothing to write)."""
        raw = self._file_bytes()
        if raw is None:
            return False
        try:
            current = self._parse(raw)
        except errors.BackupInvalid:
            return False
        return (current.public_key == backup.public_key
                and current.matches(backup.fingerprints()))

    def _set_aside_unusable_file(self, keys: dict[int, SecretKey]) -> None:
        """Move a corrupt or non-matching server file to ``<file>.corrupt`` before restoring.

        Otherwise writing the restored copy would rotate the bad file into ``<file>.prev``
        and push out the previous *good* copy.
        """
        path = self._backup_path
        if not path.exists() and not path.is_symlink():
            return
        raw = self._file_bytes()
        if raw is not None:
            try:
                if self._parse(raw).matches({g: fingerprint(k) for g, k in keys.items()}):
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

    def _failed_attempt(self) -> None:
        self.recover_failures += 1
        delay = self._backoff.failed()
        log.warning("wrong password", failures=self._backoff.failures, next_attempt_in=delay)

    def _file_bytes(self) -> bytes | None:
        try:
            return read_backup_file(self._backup_path)
        except (FileNotFoundError, BackupFileError, OSError):
            return None

    def _parse(self, raw: bytes) -> Backup:
        try:
            return Backup.parse(raw, allow_insecure_kdf_for_tests=self._allow_insecure_kdf)
        except BackupVersionUnsupported as exc:
            raise errors.BackupInvalid(f"unsupported backup format: {exc}") from None
        except BackupCorrupt as exc:
            raise errors.BackupInvalid(f"the backup is corrupt: {exc}") from None

    def _parse_for_opening(self, raw: bytes) -> Backup:
        """Parse a backup about to be opened with a password, and bound its KDF costs."""
        backup = self._parse(raw)
        try:
            check_kdf_bound(backup, self._kdf_bound)
        except BackupCorrupt as exc:
            raise errors.BackupInvalid(
                f"the backup is invalid: {exc} (if it was made with higher --kdf-* settings, "
                "start Nexus with those settings to open it)"
            ) from None
        return backup

    def _load_backup_for_recovery(self, exported: bytes) -> tuple[Backup, bytes]:
        if exported:
            return self._parse_for_opening(exported), exported
        raw = self._file_bytes()
        if raw is None:
            raise errors.BackupInvalid(
                f"the backup file {self._backup_path} is missing or unreadable: run "
                "`spike recover --backup-file EXPORTED_COPY`"
            )
        return self._parse_for_opening(raw), raw

    def _split_retired(self, keys: dict[int, SecretKey]) -> list[int]:
        """The generations of ``keys`` to ignore: ones this Nexus created and has retired
        (or dropped after an aborted rotation) since the backup was made. They are never
        loaded. Raises for a generation this Nexus never created."""
        recorded = self.generations_recorded()
        if not recorded:
            return []
        retired = self.generations_retired()
        high = max(int(self._store.get_state(HIGH_WATER_STATE) or 0), max(recorded),
                   max(retired, default=0))
        ignored: list[int] = []
        unknown: list[int] = []
        for generation in sorted(set(keys) - set(recorded)):
            if generation in retired:
                if not fingerprints_equal(fingerprint(keys[generation]),
                                          bytes.fromhex(retired[generation])):
                    log.warning("a retired generation in the backup does not match its "
                                "record; ignored", generation=generation)
                ignored.append(generation)
            elif generation <= high:
                # A number this Nexus issued and no longer records (retired before it
                # remembered retired keys, or an aborted rotation's): never loaded, so
                # whatever key it holds can do no harm.
                ignored.append(generation)
            else:
                unknown.append(generation)
        if unknown:
            # The backup's public key is in the file, so anyone who can write the file
            # can seal a key of their choosing into it; only generations this Nexus
            # created (recorded with their fingerprint) are ever accepted.
            raise errors.BackupInvalid(
                f"the backup holds generation(s) {unknown} that this Nexus never "
                "created: refusing a key that may have been planted"
            )
        if ignored and not set(keys) - set(ignored):
            raise errors.BackupInvalid(
                f"the backup holds only generation(s) {ignored} that this Nexus has retired "
                "since (a rotation completed after it was made): use a newer copy"
            )
        return ignored

    def _check_against_store(self, keys: dict[int, SecretKey]) -> None:
        recorded = self.generations_recorded()
        for generation, info in recorded.items():
            key = keys.get(generation)
            if key is None:
                continue
            if not fingerprints_equal(fingerprint(key), bytes.fromhex(info.fingerprint)):
                raise errors.BackupInvalid(
                    f"generation {generation} in this backup does not match this Nexus's "
                    "records: is it a backup of another Nexus?"
                )
        # By the ciphertext headers, not the plaintext generation column (nexus.core.integrity).
        needed = needed_generations(self._store, recorded)
        missing = sorted(needed - set(keys))
        if missing:
            raise errors.BackupInvalid(
                f"the backup lacks generation(s) {missing} that stored records still need"
            )
        if recorded and not set(keys) & set(recorded):
            raise errors.BackupInvalid("this backup belongs to another Nexus")

    def _notify_unsealed(self) -> None:
        for listener in self._unseal_listeners:
            try:
                listener()
            except Exception:
                log.exception("unseal listener failed")

    # ------------------------------------------------------------------ backup

    def _write_backup(self, backup: Backup) -> None:
        """Write atomically, then read back and check: every change is verified."""
        data = backup.to_bytes()
        try:
            write_backup_file(self._backup_path, data)
        except OSError as exc:
            self.backup_health.status = "unknown"
            self.backup_health.detail = f"write failed: {exc.strerror or exc}"
            raise errors.Unavailable(f"cannot write the backup file: {exc.strerror}") from None
        now = self._clock()
        self.backup_health.last_written = now
        if self._file_bytes() != data:
            self.backup_health.status = "corrupt"
            self.backup_health.detail = "read-back after write differs from what was written"
            raise errors.Unavailable("the backup file did not read back as written")
        self._parse_for_opening(data)  # structure and KDF bounds, as recovery will see them
        self.backup_health.status = "ok"
        self.backup_health.detail = ""
        self.backup_health.last_verified = now
        self._verified_signature = self._file_signature()

    def backup_generations(self) -> tuple[int, ...]:
        return self._backup.generations if self._backup else ()

    def kdf_description(self) -> str:
        params = self._backup.params if self._backup else None
        if params is None:
            return ""
        return (f"argon2id t={params.time_cost} m={params.memory_kib}KiB "
                f"p={params.parallelism}")

    def _file_signature(self) -> tuple[int, int, int, int] | None:
        """What identifies the file's current content cheaply (None when it is absent)."""
        try:
            st = os.lstat(self._backup_path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def backup_file_changed(self) -> bool:
        """True when the file was deleted, replaced or modified since it was last checked."""
        return self._file_signature() != self._verified_signature

    def verify_backup_file(self) -> BackupHealth:
        """Check the file's structure and that it matches the keys in memory (no password)."""
        with self._health_lock:
            return self._verify_backup_file()

    def _verify_backup_file(self) -> BackupHealth:
        health = self.backup_health
        signature = self._file_signature()
        now = self._clock()
        raw: bytes | None = None
        try:
            raw = read_backup_file(self._backup_path)
        except FileNotFoundError:
            health.status, health.detail = "missing", f"{self._backup_path} is missing"
        except OSError as exc:  # BackupFileError included: too large, not a regular file
            health.status = "corrupt"
            health.detail = f"{self._backup_path} is unreadable: {exc.strerror or exc}"
        if raw is not None:
            try:
                parsed = self._parse_for_opening(raw)
            except errors.BackupInvalid as exc:
                health.status, health.detail = "corrupt", str(exc)
            else:
                keyring = self._keyring
                if keyring.active_generation is None:
                    health.status, health.detail = "ok", "structure ok (sealed: keys not checked)"
                elif parsed.matches(keyring.fingerprints()):
                    health.status, health.detail = "ok", ""
                else:
                    health.status = "mismatch"
                    health.detail = (f"backup holds generations {list(parsed.generations)}, "
                                     f"memory holds {list(keyring.generations)}")
        health.last_verified = now
        self._verified_signature = signature
        if health.status != "ok":
            log.warning("backup check failed", status=health.status, detail=health.detail)
        return health

    def verify_with_password(self, password: bytes) -> tuple[int, ...]:
        """Prove that ``password`` opens the backup and that it matches memory.

        Every password attempt runs under the lifecycle lock, one at a time, so that
        concurrent guesses cannot slip past the backoff (nor run many 64 MiB KDFs).
        """
        try:
            with self._lock:
                return self._verify_with_password(password)
        except errors.WrongPassword:
            self._wait_out_backoff()
            raise

    def _verify_with_password(self, password: bytes) -> tuple[int, ...]:
        keyring = self.require_unsealed()
        self._backoff.check()
        raw = self._file_bytes()
        if raw is None:
            raise errors.BackupInvalid(f"the backup file {self._backup_path} is missing")
        backup = self._parse_for_opening(raw)
        pw = _password_bytes(password)
        try:
            keys = open_backup(backup, pw, bound=self._kdf_bound)
        except WrongPassword:
            self._failed_attempt()
            raise errors.WrongPassword("the password does not open the backup") from None
        except BackupCorrupt as exc:
            raise errors.BackupInvalid(f"the backup is invalid: {exc}") from None
        finally:
            wipe_bytearray(pw)
        try:
            fps = {g: fingerprint(k) for g, k in keys.items()}
        finally:
            for key in keys.values():
                key.wipe()
        self._backoff.succeeded()
        if set(fps) != set(keyring.generations) or not all(
            fingerprints_equal(fps[g], keyring.fingerprint_for(g)) for g in fps
        ):
            self.backup_health.status = "mismatch"
            raise errors.BackupInvalid("the backup does not match the keys in memory")
        self.backup_health.status = "ok"
        self.backup_health.detail = ""
        self.backup_health.last_verified = self._clock()
        return tuple(sorted(fps))

    def export_backup(self) -> tuple[bytes, tuple[int, ...]]:
        self.require_unsealed()
        raw = self._file_bytes()
        if raw is None:
            if self._backup is None:
                raise errors.BackupInvalid("no backup is available")
            raw = self._backup.to_bytes()
        return raw, self._parse(raw).generations

    def change_password(self, old: bytes, new: bytes) -> tuple[int, ...]:
        try:
            return self._change_password(old, new)
        except errors.WrongPassword:
            self._wait_out_backoff()
            raise

    def _change_password(self, old: bytes, new: bytes) -> tuple[int, ...]:
        with self._lock:
            keyring = self.require_unsealed()
            self._verify_with_password(old)
            try:
                pw = check_password(new)
            except PasswordRejected as exc:
                raise errors.PasswordRejected(str(exc)) from None
            try:
                backup, _, record_key = create_backup_with_record_key(pw, keyring.keys(),
                                                                      self._kdf_params)
            finally:
                wipe_bytearray(pw)
            # "pending" first: a crash between the write and the record leaves a file
            # that recovery still accepts without --accept-old-password. The records get
            # their tags under the new password before the new file exists, and keep the
            # old ones (copies sealed under the old password still recover).
            current = self._backup.public_key.digest_hex if self._backup else ""
            self._record_backup_key(current or backup.public_key.digest_hex,
                                    pending=backup.public_key.digest_hex)
            self._set_record_key(record_key, backup.public_key.digest_hex)
            self._record_generations(self._live_records(keyring))
            self._write_backup(backup)
            self._record_backup_key(backup.public_key.digest_hex)
            self._backup = backup
            self.backup_health.status = "ok"
            self.backup_health.detail = ""
            self.backup_health.last_verified = self._clock()
            return backup.generations

    # ------------------------------------------------------------------ rotation support

    def next_generation(self) -> int:
        """The number the next root key gets. Never reused, even after an aborted rotation
        dropped it: an old export holding that number must never pass for the current key."""
        keyring = self.require_unsealed()
        high = int(self._store.get_state(HIGH_WATER_STATE) or 0)
        return max(max(keyring.generations), high) + 1

    def add_generation(self) -> GenerationInfo:
        """Generate RK(g+1) and seal it into the backup *before* it is used; activate it."""
        with self._lock:
            keyring = self.require_unsealed()
            assert self._backup is not None
            new_generation = self.next_generation()
            self._store.put_state(HIGH_WATER_STATE, str(new_generation))
            key = SecretKey.generate()
            try:
                testpoints.reached("new_key_generated")
                info = GenerationInfo(new_generation, fingerprint(key).hex(), self._clock())
                # Recorded *before* the backup holds it: recovery accepts only generations
                # this Nexus recorded, so a key sealed into the backup by anyone else
                # (the public key is in the file) is refused. Entries for keys that never
                # made it into memory (an earlier crash) are dropped here.
                recorded = {g: i for g, i in self.generations_recorded().items()
                            if g in keyring.generations}
                recorded[new_generation] = info
                self._pending_generation = new_generation
                holding = {g: keyring.entry(g).fingerprint_hex for g in keyring.generations}
                holding[new_generation] = info.fingerprint
                self._record_generations(recorded, holding=holding)
                keys = dict(keyring.keys())
                keys[new_generation] = key
                backup = self._backup.reseal(keys)
                self._write_backup(backup)
            except BaseException:
                key.wipe()
                raise
            testpoints.reached("backup_updated")
            self._backup = backup
            self._keyring = keyring.with_key(new_generation, key, activate=True)
        log.info("root key generation added", generation=new_generation,
                 fingerprint=info.fingerprint)
        return info

    def assert_current(self, keyring: Keyring) -> None:
        """Refuse to encrypt when another node sharing the store has a newer root key.

        Several Nexus nodes may share one PostgreSQL store. If another node rotated,
        writing under our older generation would put data under a key that node is
        about to drop. The recorded generations are re-read at most once a second.
        """
        now = time.monotonic()
        if now - self._latest_checked >= 1.0:
            self._latest_recorded = max(self.generations_recorded(), default=0)
            self._latest_checked = now
        latest = self._latest_recorded
        if latest == self._pending_generation:
            return  # our own new key, recorded a moment before it enters the keyring
        if latest > (keyring.active_generation or 0) and latest not in keyring.generations:
            raise errors.NotReady(
                "stale",
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
                self._record_generations(recorded)

    def activate(self, generation: int) -> None:
        with self._lock:
            self._keyring = self.require_unsealed().with_active(generation)

    def drop_generation(self, generation: int) -> None:
        """Remove a generation from the backup first, then from memory (wiped)."""
        with self._lock:
            keyring = self.require_unsealed()
            assert self._backup is not None
            if generation not in keyring.generations:
                return
            remaining = keyring.without(generation)
            backup = self._backup.reseal(remaining.keys())
            self._write_backup(backup)
            testpoints.reached("generation_dropped_from_backup")
            self._backup = backup
            old_entry = keyring.entry(generation)
            self._keyring = remaining
            recorded = self.generations_recorded()
            recorded.pop(generation, None)
            # Remembered as retired: a backup made before this (the .prev copy, an older
            # export) still holds it, and must still recover (the retired key is ignored).
            self._record_generations(recorded, retire={generation: old_entry.fingerprint_hex})
        old_entry.wipe()
        log.info("root key generation dropped", generation=generation)

    # ------------------------------------------------------------------ shutdown

    def seal(self) -> None:
        """Wipe every root key from memory (shutdown)."""
        self._closing.set()
        with self._lock:
            keyring = self._keyring
            self._keyring = Keyring.empty()
            record_key, self._record_key = self._record_key, None
        keyring.wipe()
        if record_key is not None:
            record_key.wipe()
