"""A planted root key (issue 11, item 11).

Whoever can write both the database and the backup file could plant an active root key with no
password: seal a key of their own to the public key in the file (HPKE needs only the public
key) and add its fingerprint to the store's record of generations. Recovery then accepted it as
a generation this Nexus created and made it the active key. Every generation record now carries
an HMAC tag under a key derived from the password (with the backup key pair, at init, recover
and password change; kept in memory to tag the records a rotation adds), so nobody without the
password can add or alter one.

The tests only use the store's state rows and the backup format, so they run against the code
before the fix too, where the planted key was accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus.backup import format as backup_format
from nexus.backup.format import Backup
from nexus.core import errors
from nexus.core.keymanager import KeyManager
from nexus.crypto.keys import fingerprint
from nexus.crypto.secret_buffer import SecretKey
from nexus.store import open_store
from tests.harness import (
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    close_keys,
    open_keys,
    pilot,
    pilot_json,
    state_json,
)

PASSWORD = TEST_PASSWORD.encode()
NEW = b"violet anchor drizzle quantum ferry"
BACKUP = "root-key.backup"
ATTACKER = b"A" * 32


def manager(tmp: Path) -> KeyManager:
    return open_keys(tmp)


def attacker_key() -> SecretKey:
    return SecretKey.from_bytes_consuming(bytearray(ATTACKER))


def plant(tmp: Path, generation: int, *, tag_from: int | None = None,
          replace: bool = False) -> str:
    """What an attacker with write access to the data directory does (Nexus stopped).

    Seals their key under ``generation`` into the backup (only the public key is needed) and
    records its fingerprint in the store. ``tag_from`` copies another record's fields (e.g. its
    tag) onto the planted one. Returns the planted fingerprint (hex).
    """
    path = tmp / BACKUP
    backup = Backup.parse(path.read_bytes(), allow_insecure_kdf_for_tests=True)
    key = attacker_key()
    planted = backup_format._seal_all(backup.public_key, {generation: key})[0]
    sealed = {s.generation: s for s in backup.sealed}
    sealed[generation] = planted
    path.write_bytes(Backup(backup.params, backup.salt, backup.public_key,
                            tuple(sealed[g] for g in sorted(sealed))).to_bytes())
    fp = fingerprint(key).hex()
    store = open_store("sqlite", path=tmp / "spike.db")
    try:
        records = json.loads(store.get_state("root_keys") or "{}")
        entry: dict[str, object] = {}
        if tag_from is not None:
            entry.update(records[str(tag_from)])
        elif str(generation) in records:
            entry.update(records[str(generation)])
        entry.update({"fingerprint": fp, "created": 1.0})
        if replace or tag_from is not None or str(generation) not in records:
            records[str(generation)] = entry
        store.put_state("root_keys", json.dumps(records))
        high = int(store.get_state("root_key_generation_high_water") or 0)
        store.put_state("root_key_generation_high_water", str(max(high, generation)))
    finally:
        store.close()
    return fp


def initialized(tmp: Path) -> dict[int, bytes]:
    keys = manager(tmp)
    keys.init(PASSWORD)
    fingerprints = keys.keyring.fingerprints()
    close_keys(keys)
    return fingerprints


@pytest.mark.parametrize("generation", [2, 9])
def test_a_planted_new_generation_is_refused(tmp_path: Path, generation: int) -> None:
    initialized(tmp_path)
    plant(tmp_path, generation)
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid):
        keys.recover(PASSWORD)
    assert not keys.is_unsealed()
    close_keys(keys)


def test_a_planted_generation_with_a_copied_tag_is_refused(tmp_path: Path) -> None:
    initialized(tmp_path)
    plant(tmp_path, 2, tag_from=1)
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid):
        keys.recover(PASSWORD)
    assert not keys.is_unsealed()
    close_keys(keys)


def test_a_replaced_key_under_the_current_generation_is_refused(tmp_path: Path) -> None:
    initialized(tmp_path)
    plant(tmp_path, 1, replace=True)  # the attacker's key as generation 1, record rewritten
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid):
        keys.recover(PASSWORD)
    assert not keys.is_unsealed()
    close_keys(keys)


def test_the_message_says_what_happened(tmp_path: Path) -> None:
    initialized(tmp_path)
    plant(tmp_path, 2)
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match="not authenticated"):
        keys.recover(PASSWORD)
    close_keys(keys)


def test_genuine_histories_still_recover(tmp_path: Path) -> None:
    """Rotations before and after a password change: every record stays authenticated."""
    keys = manager(tmp_path)
    keys.init(PASSWORD)
    keys.add_generation()
    keys.drop_generation(1)
    keys.change_password(PASSWORD, NEW)
    keys.add_generation()
    fingerprints = keys.keyring.fingerprints()
    assert set(fingerprints) == {2, 3}
    close_keys(keys)
    again = manager(tmp_path)
    assert again.recover(NEW).fingerprints() == fingerprints
    close_keys(again)


def test_old_password_copy_recovers_with_consent(tmp_path: Path) -> None:
    keys = manager(tmp_path)
    keys.init(PASSWORD)
    keys.add_generation()
    keys.drop_generation(1)
    before = (tmp_path / BACKUP).read_bytes()
    keys.change_password(PASSWORD, NEW)
    close_keys(keys)
    again = manager(tmp_path)
    recovery = again.recover_detailed(PASSWORD, before, accept_old_password=True)
    assert recovery.old_password_accepted and recovery.keyring.generations == (2,)
    close_keys(again)


def test_nexus_never_vouches_for_a_record_it_only_read(tmp_path: Path) -> None:
    """A record planted in the store while Nexus runs gets no tag from Nexus's own writes."""
    keys = manager(tmp_path)
    keys.init(PASSWORD)
    store = keys._store
    records = state_json(store, "root_keys")
    records["5"] = {"fingerprint": fingerprint(attacker_key()).hex(), "created": 1.0}
    store.put_state("root_keys", json.dumps(records))
    keys.ensure_recorded()
    keys.add_generation()  # a rotation's first step, then its last
    keys.drop_generation(1)
    records = state_json(store, "root_keys")
    assert "tags" not in records.get("5", {}), records
    assert records["2"]["tags"], records
    close_keys(keys)


# ---------------------------------------------------------------- a real Nexus


def test_spike_recover_refuses_a_planted_key(agent: DevAgent, data_dir: Path, tmp: Path) -> None:
    pw = tmp / "pw"
    pw.write_text(TEST_PASSWORD + "\n")
    su = agent.env("pilot")
    nexus = Nexus(data_dir, agent.env("nexus"))
    try:
        pilot_json(["init", "--password-file", str(pw), "--output", "json"], su, nexus)
        assert pilot(["secret", "put", "app/db", "pass=s3"], su, nexus).returncode == 0
        nexus.stop()
        planted = plant(data_dir, 2)
        nexus = Nexus(data_dir, agent.env("nexus"))
        refused = pilot(["recover", "--password-file", str(pw), "--output", "json"], su, nexus)
        assert refused.returncode == 8, refused
        assert "planted" in refused.stderr, refused.stderr
        state = pilot_json(["status", "--output", "json"], su, nexus)
        assert state["state"] == "sealed"
        assert planted not in json.dumps(state)
    finally:
        nexus.stop()
