"""The generation ledger: the authenticated record of root key generations kept in the store.

Durable facts kept in the store (never a key): each generation's fingerprint and creation time
(state key ``root_keys``), the generations retired since (``retired``), the highest generation
number ever issued (never reused, even after an aborted rotation dropped it) and which
password-key the backup is sealed to. After recovery every fingerprint is checked against the
ledger, so a foreign backup or a wrong key can never be installed silently.

The record of every generation after the first also holds that key wrapped under the generation
before it (``wrapped``: :mod:`nexus.crypto.wrap`), written in the same store write that makes the
generation known: the keyring of record, from which a node that holds the parent takes the new
key without the password. The sealed backup itself is kept in the store too (``sealed_backup``).

Each live record carries HMAC tags (``tags``: password-key digest -> tag) under the *record key*,
derived from the password with the backup key pair (:func:`nexus.backup.format.record_tag`).
Recovery loads a generation only when its record has a valid tag under the password that opened
the backup, so whoever can write the database and the backup file but does not know the password
cannot plant a key (sealing one to the backup's public key needs no password). The record key
stays in memory while unsealed, so a rotation tags the record of its new key; the ledger tags only
records of keys the caller holds. Retired generations are kept so that older backups still
recover.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from nexus.backup.format import record_tag, record_tag_valid
from nexus.core import errors
from nexus.core.integrity import needed_generations
from nexus.crypto.keyring import Keyring
from nexus.crypto.keys import fingerprint, fingerprints_equal
from nexus.crypto.secret_buffer import SecretBuffer, SecretKey
from nexus.store.base import Store

log = structlog.get_logger("nexus.keys")

ROOT_KEYS_STATE = "root_keys"
# Which password-key the backup is sealed to (SHA-256 of the backup's public key): "current",
# and "pending" while a password change is being written. A backup sealed to another key was
# made under an earlier password; recovering from it needs the operator's explicit consent.
BACKUP_KEY_STATE = "backup_public_key"
HIGH_WATER_STATE = "root_key_generation_high_water"
# The sealed backup of record (what each node's backup file is a copy of), base64.
BACKUP_COPY_STATE = "sealed_backup"
MAX_RETIRED = 256  # retired generations remembered (as many as a backup can hold)
MAX_RECORD_TAGS = 4  # tags per record: the current password-key and the ones before it

Records = dict[str, dict[str, object]]


@dataclass(frozen=True)
class Wrapped:
    """A generation's key wrapped under generation ``parent`` (:mod:`nexus.crypto.wrap`)."""

    parent: int
    blob: bytes


@dataclass(frozen=True)
class GenerationInfo:
    generation: int
    fingerprint: str  # hex
    created: float


def held_fingerprints(keys: Mapping[int, SecretKey]) -> dict[int, str]:
    """Generation -> fingerprint hex of keys the caller holds (what the ledger may tag)."""
    return {g: fingerprint(k).hex() for g, k in keys.items()}


class GenerationLedger:
    """Reads and writes the generation records; holds the record key while unsealed."""

    def __init__(self, store: Store, clock: Callable[[], float], *,
                 authenticate_legacy_records: bool = False) -> None:
        self._store = store
        self._clock = clock
        # The operator's one-time upgrade consent: records with no tag at all (written before
        # records were authenticated) are accepted once the password opened the backup and
        # its keys match them, and are tagged then.
        self._authenticate_legacy = authenticate_legacy_records
        # The record key of the backup's password and the password-key it belongs to: set at
        # init, recover and password change, wiped at seal.
        self._record_key: SecretBuffer | None = None
        self._record_key_id = ""
        self._latest_recorded = 0
        self._latest_checked = -1e9

    # ------------------------------------------------------------------ reading

    def records(self) -> Records:
        """The raw records document (generation as a string -> its fields)."""
        raw = self._store.get_state(ROOT_KEYS_STATE)
        if not raw:
            return {}
        doc: Records = json.loads(raw)
        return doc

    def recorded(self) -> dict[int, GenerationInfo]:
        """The generations this Nexus created and still uses (retired ones left out)."""
        return {
            int(g): GenerationInfo(int(g), str(v["fingerprint"]),
                                   float(v["created"]))  # type: ignore[arg-type]
            for g, v in self.records().items() if "retired" not in v
        }

    def retired(self) -> dict[int, str]:
        """Generations this Nexus created and retired (dropped after a rotation): generation
        -> fingerprint hex. A backup made before the rotation still holds them."""
        return {int(g): str(v["fingerprint"])
                for g, v in self.records().items() if "retired" in v}

    def live_records(self, keyring: Keyring) -> dict[int, GenerationInfo]:
        """The recorded generations held in ``keyring`` (filling in any missing record)."""
        recorded = self.recorded()
        return {g: recorded.get(g) or GenerationInfo(g, keyring.entry(g).fingerprint_hex,
                                                     self._clock())
                for g in keyring.generations}

    def wrapped(self, generation: int) -> Wrapped | None:
        """The keyring of record's wrap of ``generation`` under its parent (None: none)."""
        entry = self.records().get(str(generation), {})
        doc = entry.get("wrapped") if "retired" not in entry else None
        if not isinstance(doc, dict):
            return None
        try:
            return Wrapped(int(doc["parent"]), bytes.fromhex(str(doc["blob"])))
        except (KeyError, TypeError, ValueError):
            log.warning("an unreadable wrapped key record; ignored", generation=generation)
            return None

    def latest(self) -> int:
        """The newest recorded generation, re-read from the store at most once a second."""
        now = time.monotonic()
        if now - self._latest_checked >= 1.0:
            self._latest_recorded = max(self.recorded(), default=0)
            self._latest_checked = now
        return self._latest_recorded

    # ------------------------------------------------------------------ writing

    def record(self, infos: dict[int, GenerationInfo], holding: Mapping[int, str],
               retire: dict[int, str] | None = None,
               wraps: Mapping[int, Wrapped] | None = None) -> None:
        """Write the live generations ``infos``; retired entries are kept (the newest
        MAX_RETIRED), plus ``retire`` (generation -> fingerprint hex) newly retired now.

        Each live record keeps the tags it has for the same fingerprint, and gets a tag under
        the record key in memory only when the caller *holds* that key (``holding``,
        generation -> fingerprint hex): Nexus never vouches for a record it merely read from
        the store. ``wraps`` (generation -> its wrap under its parent) adds the keyring of
        record's entry of a new generation; entries keep the wrap they have.
        """
        old = self.records()
        doc = self._kept_retired(old, infos, retire or {})
        for g, info in sorted(infos.items()):
            entry = self._live_entry(old.get(str(g), {}), info, holding.get(g))
            wrapped = (wraps or {}).get(g)
            if wrapped is not None:
                entry["wrapped"] = {"parent": wrapped.parent, "blob": wrapped.blob.hex()}
            doc[str(g)] = entry
        self._store.put_state(ROOT_KEYS_STATE, json.dumps(doc, sort_keys=True))

    def _kept_retired(self, old: Records, infos: dict[int, GenerationInfo],
                      retire: dict[int, str]) -> Records:
        retired = {g: v for g, v in old.items() if "retired" in v and int(g) not in infos}
        now = self._clock()
        for g, fp in retire.items():
            if g not in infos:
                retired[str(g)] = {"fingerprint": fp, "retired": now}
        newest = sorted(retired, key=int)[-MAX_RETIRED:]
        return {g: retired[g] for g in newest}

    def _live_entry(self, before: dict[str, object], info: GenerationInfo,
                    held: str | None) -> dict[str, object]:
        entry: dict[str, object] = {"fingerprint": info.fingerprint, "created": info.created}
        kept = before.get("tags")
        tags: dict[str, str] = {}
        if before.get("fingerprint") == info.fingerprint and isinstance(kept, dict):
            tags = {k: v for k, v in kept.items() if isinstance(k, str) and isinstance(v, str)}
        if self._record_key is not None and held == info.fingerprint:
            tags.pop(self._record_key_id, None)
            tags[self._record_key_id] = record_tag(self._record_key, info.generation,
                                                   bytes.fromhex(info.fingerprint))
        if tags:
            entry["tags"] = dict(list(tags.items())[-MAX_RECORD_TAGS:])
        if before.get("fingerprint") == info.fingerprint and "wrapped" in before:
            entry["wrapped"] = before["wrapped"]
        return entry

    def set_record_key(self, record_key: SecretBuffer, key_id: str) -> None:
        """Tag from now on under ``record_key`` (the ledger owns it; the previous one is
        wiped)."""
        previous = self._record_key
        self._record_key, self._record_key_id = record_key, key_id
        if previous is not None and previous is not record_key:
            previous.wipe()

    def take_record_key(self) -> SecretBuffer | None:
        """Forget the record key (at seal) and hand it to the caller to wipe."""
        record_key, self._record_key = self._record_key, None
        return record_key

    # ------------------------------------------------------------------ generation numbers

    def high_water(self) -> int:
        return int(self._store.get_state(HIGH_WATER_STATE) or 0)

    def raise_high_water(self, generation: int) -> None:
        self._store.put_state(HIGH_WATER_STATE, str(generation))

    # ------------------------------------------------------------------ the sealed backup

    def record_backup_copy(self, data: bytes) -> None:
        """Keep ``data`` (a sealed backup: public key, KDF parameters, sealed keys; nothing
        that opens without the password) as the store's backup of record."""
        self._store.put_state(BACKUP_COPY_STATE, base64.b64encode(data).decode("ascii"))

    def backup_copy(self) -> bytes | None:
        """The store's backup of record, or None (none kept, or unreadable)."""
        raw = self._store.get_state(BACKUP_COPY_STATE)
        if not raw:
            return None
        try:
            return base64.b64decode(raw, validate=True)
        except ValueError:
            log.warning("the store's copy of the backup is not base64; ignored")
            return None

    # ------------------------------------------------------------------ password-key record

    def backup_keys(self) -> dict[str, str]:
        """``current`` (and ``pending`` mid-change): the password-keys the backup is sealed to."""
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

    def record_backup_key(self, current: str, pending: str = "") -> None:
        doc = {"current": current}
        if pending:
            doc["pending"] = pending
        self._store.put_state(BACKUP_KEY_STATE, json.dumps(doc, sort_keys=True))

    def sealed_under_an_earlier_password(self, key_id: str) -> bool:
        known = self.backup_keys()
        if not known:
            return False  # a Nexus from before this record: nothing to compare with
        return key_id not in known.values()

    # ------------------------------------------------------------------ checks of a backup

    def check_tags(self, keys: dict[int, SecretKey], record_key: SecretBuffer,
                   key_id: str) -> bool:
        """Every recorded generation about to be loaded must carry a valid tag under the
        record key of the password that opened the backup (a planted record cannot).

        True when the records predate authentication and the operator started Nexus with
        ``--authenticate-legacy-records``: they are accepted (the caller tags them)."""
        raw = self.records()
        if not raw and self._store.is_empty():
            # An init that died between writing the backup and recording its key: nothing
            # is stored under any key yet. The records are written (and tagged) now.
            log.warning("no generation records and an empty store: accepting the backup's "
                        "keys and recording them", generations=sorted(keys))
            return False
        live = [v for v in raw.values() if isinstance(v, dict) and "retired" not in v]
        if live and not any(v.get("tags") for v in live):
            return self._accept_legacy(keys)
        for generation in sorted(keys):
            tags = raw.get(str(generation), {}).get("tags")
            tag = tags.get(key_id) if isinstance(tags, dict) else None
            if not record_tag_valid(record_key, generation, fingerprint(keys[generation]), tag):
                raise errors.BackupInvalid(
                    f"the record of generation {generation} is not authenticated under this "
                    "backup's password: refusing a key that may have been planted (or the "
                    "store's records predate authenticated records, or the password was "
                    f"changed more than {MAX_RECORD_TAGS - 1} times since this backup)"
                )
        return False

    def _accept_legacy(self, keys: dict[int, SecretKey]) -> bool:
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

    def split_retired(self, keys: dict[int, SecretKey]) -> list[int]:
        """The generations of ``keys`` to ignore: ones this Nexus created and has retired
        (or dropped after an aborted rotation) since the backup was made. They are never
        loaded. Raises for a generation this Nexus never created."""
        recorded = self.recorded()
        if not recorded:
            return []
        retired = self.retired()
        high = max(self.high_water(), max(recorded), max(retired, default=0))
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
        _refuse_unusable(keys, ignored, unknown)
        return ignored

    def check_keys(self, keys: dict[int, SecretKey]) -> None:
        """The backup's keys are this Nexus's: recorded fingerprints match, and every
        generation the stored records need is there."""
        recorded = self.recorded()
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


def _refuse_unusable(keys: Iterable[int], ignored: list[int], unknown: list[int]) -> None:
    if unknown:
        # The backup's public key is in the file, so anyone who can write the file can seal a
        # key of their choosing into it; only generations this Nexus created (recorded with
        # their fingerprint) are ever accepted.
        raise errors.BackupInvalid(
            f"the backup holds generation(s) {unknown} that this Nexus never "
            "created: refusing a key that may have been planted"
        )
    if ignored and not set(keys) - set(ignored):
        raise errors.BackupInvalid(
            f"the backup holds only generation(s) {ignored} that this Nexus has retired "
            "since (a rotation completed after it was made): use a newer copy"
        )
