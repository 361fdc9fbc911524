"""The backup's public key is in the file: anyone who can write the file can seal a key
of their own into it without the password. Recovery must refuse such a key (found in
review: it used to activate it, so later writes were under a key the attacker knew)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus.app import build_keys
from nexus.backup.format import Backup
from nexus.core import errors
from nexus.core.keymanager import KeyManager
from nexus.crypto.secret_buffer import SecretKey
from nexus.store import Store, open_store
from tests.harness import nexus_config

PASSWORD = b"correct horse battery staple orbit"


def manager(tmp: Path) -> tuple[KeyManager, Store]:
    store = open_store("sqlite", path=tmp / "spike.db")
    return build_keys(nexus_config(tmp), store), store


def stop(keys: KeyManager, store: Store) -> None:
    """Seal and close the store, as a stopping Nexus does (one store per SQLite file)."""
    keys.seal()
    store.close()


def plant(tmp: Path, generation: int) -> None:
    path = tmp / "root-key.backup"
    backup = Backup.parse(path.read_bytes(), allow_insecure_kdf_for_tests=True)
    attacker_key = SecretKey.from_bytes_consuming(bytearray(b"A" * 32))
    # Keys the attacker cannot know stay sealed as they are; only the public key is used.
    forged = backup.reseal({generation: attacker_key})
    sealed = {s.generation: s for s in backup.sealed}
    sealed[generation] = forged.sealed[0]
    forged = Backup(backup.params, backup.salt, backup.public_key,
                    tuple(sealed[g] for g in sorted(sealed)))
    path.write_bytes(forged.to_bytes())


@pytest.mark.parametrize("generation", [2, 7])
def test_a_planted_generation_is_refused(tmp_path: Path, generation: int) -> None:
    first, store = manager(tmp_path)
    first.init(PASSWORD)
    stop(first, store)
    plant(tmp_path, generation)
    again, _ = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match="never created"):
        again.recover(PASSWORD)
    assert not again.is_unsealed()


def test_the_real_backup_still_recovers(tmp_path: Path) -> None:
    first, store = manager(tmp_path)
    first.init(PASSWORD)
    first.add_generation()
    fingerprints = first.keyring.fingerprints()
    stop(first, store)
    again, _ = manager(tmp_path)
    keyring = again.recover(PASSWORD)
    assert keyring.fingerprints() == fingerprints
    assert keyring.active_generation == 2
