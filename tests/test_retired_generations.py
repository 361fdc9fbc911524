"""After a completed rotation, ``<backup>.prev`` and older exports still recover (issue 11,
item 10).

They hold the retired generation next to the current one, and used to be refused ("holds
generation(s) [1] that this Nexus never created"), so the recovery runbook's fallback step
failed in the normal state. A backup that holds every generation still in use plus retired
ones now recovers: the retired keys are ignored (never loaded) and reported. A generation this
Nexus never issued is still refused as planted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus.backup import format as backup_format
from nexus.backup.format import Backup
from nexus.core import errors
from nexus.core.keymanager import KeyManager
from nexus.crypto.secret_buffer import SecretKey
from tests.harness import close_keys, open_keys

PASSWORD = b"correct horse battery staple orbit"
BACKUP = "root-key.backup"


def manager(tmp: Path) -> KeyManager:
    return open_keys(tmp)


def rotated(tmp: Path) -> tuple[bytes, bytes, dict[int, bytes]]:
    """init, then the key manager's part of a completed rotation 1 -> 2 (add, then drop).

    Returns the backup before the rotation, the .prev copy after it, and the fingerprints.
    """
    keys = manager(tmp)
    keys.init(PASSWORD)
    before = (tmp / BACKUP).read_bytes()
    keys.add_generation()
    keys.drop_generation(1)
    fingerprints = keys.keyring.fingerprints()
    assert set(fingerprints) == {2}
    prev = (tmp / (BACKUP + ".prev")).read_bytes()
    assert Backup.parse(prev, allow_insecure_kdf_for_tests=True).generations == (1, 2)
    close_keys(keys)
    return before, prev, fingerprints


def test_the_prev_copy_after_a_rotation_recovers(tmp_path: Path) -> None:
    _, prev, fingerprints = rotated(tmp_path)
    keys = manager(tmp_path)
    keyring = keys.recover(PASSWORD, prev)
    assert keyring.fingerprints() == fingerprints
    assert keyring.active_generation == 2
    close_keys(keys)


def test_the_retired_generation_is_ignored_and_reported(tmp_path: Path) -> None:
    _, prev, _ = rotated(tmp_path)
    keys = manager(tmp_path)
    recovery = keys.recover_detailed(PASSWORD, prev)
    assert recovery.retired_generations == (1,)
    assert recovery.keyring.generations == (2,)
    # The server's file already held exactly generation 2: left as it was.
    assert Backup.parse((tmp_path / BACKUP).read_bytes(),
                        allow_insecure_kdf_for_tests=True).generations == (2,)
    close_keys(keys)


def test_prev_recovers_when_the_server_file_is_corrupt(tmp_path: Path) -> None:
    _, prev, fingerprints = rotated(tmp_path)
    path = tmp_path / BACKUP
    path.write_bytes(path.read_bytes()[:100])
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match="corrupt"):
        keys.recover(PASSWORD)
    recovery = keys.recover_detailed(PASSWORD, prev)
    assert recovery.keyring.fingerprints() == fingerprints
    assert recovery.retired_generations == (1,)
    # Restored without the retired key; the damaged file set aside; .prev untouched.
    restored = Backup.parse(path.read_bytes(), allow_insecure_kdf_for_tests=True)
    assert restored.generations == (2,)
    assert (tmp_path / (BACKUP + ".corrupt")).exists()
    assert (tmp_path / (BACKUP + ".prev")).read_bytes() == prev
    assert keys.verify_backup_file().status == "ok"
    close_keys(keys)
    again = manager(tmp_path)
    assert again.recover(PASSWORD).fingerprints() == fingerprints
    close_keys(again)


def test_the_prev_copy_as_the_server_file_recovers(tmp_path: Path) -> None:
    _, prev, fingerprints = rotated(tmp_path)
    (tmp_path / BACKUP).write_bytes(prev)
    keys = manager(tmp_path)
    recovery = keys.recover_detailed(PASSWORD)
    assert recovery.keyring.fingerprints() == fingerprints
    assert recovery.retired_generations == (1,)
    close_keys(keys)


def test_a_copy_with_only_the_retired_generation_is_refused_clearly(tmp_path: Path) -> None:
    before, _, _ = rotated(tmp_path)
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match="retired"):
        keys.recover(PASSWORD, before)
    assert not keys.is_unsealed()
    close_keys(keys)


def test_a_generation_never_issued_is_still_refused(tmp_path: Path) -> None:
    _, prev, _ = rotated(tmp_path)
    backup = Backup.parse(prev, allow_insecure_kdf_for_tests=True)
    planted = SecretKey.from_bytes_consuming(bytearray(b"A" * 32))
    forged = backup.reseal({3: planted})
    sealed = (*backup.sealed, forged.sealed[0])
    data = Backup(backup.params, backup.salt, backup.public_key, sealed).to_bytes()
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match="never created"):
        keys.recover(PASSWORD, data)
    close_keys(keys)


def test_a_key_planted_under_a_retired_number_is_never_loaded(tmp_path: Path) -> None:
    _, prev, fingerprints = rotated(tmp_path)
    backup = Backup.parse(prev, allow_insecure_kdf_for_tests=True)
    planted = SecretKey.from_bytes_consuming(bytearray(b"A" * 32))
    # Sealed with the public key only (Backup.reseal refuses another key for a known number).
    one = backup_format._seal_all(backup.public_key, {1: planted})[0]
    data = Backup(backup.params, backup.salt, backup.public_key,
                  (one, backup.sealed[1])).to_bytes()
    keys = manager(tmp_path)
    recovery = keys.recover_detailed(PASSWORD, data)
    assert recovery.keyring.fingerprints() == fingerprints  # generation 1 is not in memory
    assert recovery.retired_generations == (1,)
    close_keys(keys)
