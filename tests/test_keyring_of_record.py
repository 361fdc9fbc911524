"""The keyring of record: a node that holds generation g follows g+1 from the store alone.

Two key managers share one real SQLite store object (two nodes on one database, in-process):
node A rotates, node B follows without the password; wraps that do not open under a key B
holds, or open to another key, are refused and never installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus.app import build_keys
from nexus.core import errors
from nexus.core.keymanager import KeyManager
from nexus.core.ledger import BACKUP_COPY_STATE, ROOT_KEYS_STATE
from nexus.crypto.envelope import record_identity
from nexus.crypto.keyring import KeyringEntry
from nexus.crypto.keys import Purpose, fingerprint
from nexus.crypto.secret_buffer import SecretKey
from nexus.crypto.wrap import wrap_generation
from nexus.store import Store, open_store
from tests.harness import TEST_PASSWORD, nexus_config, state_json

PASSWORD = TEST_PASSWORD.encode()


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store("sqlite", path=tmp_path / "spike.db")
    yield opened
    opened.close()


def node(store: Store, directory: Path) -> KeyManager:
    directory.mkdir(exist_ok=True)
    return build_keys(nexus_config(directory), store)


def two_nodes(store: Store, tmp_path: Path) -> tuple[KeyManager, KeyManager]:
    a, b = node(store, tmp_path / "a"), node(store, tmp_path / "b")
    a.init(PASSWORD)
    assert not b.backup_path.exists()
    b.recover(PASSWORD)  # from the store's copy: node B has no file of its own yet
    return a, b


def readable_by(reader: KeyManager, writer: KeyManager) -> bool:
    identity = record_identity("secret", "p", 1)
    blob = writer.keyring.encrypt(Purpose.SECRETS, b"value", identity)
    return reader.keyring.decrypt(Purpose.SECRETS, blob, identity) == b"value"


def test_the_store_keeps_the_sealed_backup_and_a_lost_file_recovers_from_it(
        store: Store, tmp_path: Path) -> None:
    a, b = two_nodes(store, tmp_path)
    assert b.backup_path.read_bytes() == a.backup_path.read_bytes()
    assert store.get_state(BACKUP_COPY_STATE)
    a.seal()
    a.backup_path.unlink()
    again = node(store, tmp_path / "a")
    again.recover(PASSWORD)
    assert again.backup_path.read_bytes() == b.backup_path.read_bytes()
    assert readable_by(again, b)


def test_a_node_follows_a_rotation_and_the_retirement_without_the_password(
        store: Store, tmp_path: Path) -> None:
    a, b = two_nodes(store, tmp_path)
    info = a.add_generation()
    record = state_json(store, ROOT_KEYS_STATE)[str(info.generation)]
    assert record["wrapped"]["parent"] == 1
    assert b.keyring.generations == (1,)
    followed = b.follow()
    assert followed.added == (2,) and not followed.behind
    assert b.keyring.active_generation == 2
    assert readable_by(b, a) and readable_by(a, b)
    assert b.keyring.fingerprint_for(2) == a.keyring.fingerprint_for(2)
    a.drop_generation(1)
    followed = b.follow()
    assert followed.dropped == (1,)
    assert b.keyring.generations == (2,)
    # B's file is a copy of the store's backup, which holds exactly the live generations.
    assert b.backup_path.read_bytes() == a.backup_path.read_bytes()
    assert b.backup_generations() == (2,)
    assert b.follow().added == ()  # nothing new: a no-op


def _rewrite_wrap(store: Store, generation: int, blob: bytes, parent: int = 1) -> None:
    doc = state_json(store, ROOT_KEYS_STATE)
    doc[str(generation)]["wrapped"] = {"parent": parent, "blob": blob.hex()}
    store.put_state(ROOT_KEYS_STATE, json.dumps(doc, sort_keys=True))


def test_a_tampered_wrap_is_refused(store: Store, tmp_path: Path) -> None:
    a, b = two_nodes(store, tmp_path)
    a.add_generation()
    blob = bytearray(bytes.fromhex(state_json(store, ROOT_KEYS_STATE)["2"]["wrapped"]["blob"]))
    blob[20] ^= 1
    _rewrite_wrap(store, 2, bytes(blob))
    followed = b.follow()
    assert followed.added == () and followed.behind
    assert b.keyring.generations == (1,)


def test_a_planted_generation_is_refused(store: Store, tmp_path: Path) -> None:
    """Whoever can write the database but holds no root key cannot make a node take theirs:
    a wrap under a key they made up does not open, and a record whose fingerprint is not the
    wrapped key's is refused even under the real parent (here: forged with node A's key, as
    only a holder could)."""
    a, b = two_nodes(store, tmp_path)
    a.add_generation()
    stranger = KeyringEntry.create(1, SecretKey.generate())
    _rewrite_wrap(store, 2, wrap_generation(stranger, 2, SecretKey.generate()))
    assert b.follow().added == ()
    planted = SecretKey.generate()
    doc = state_json(store, ROOT_KEYS_STATE)
    doc["2"]["wrapped"] = {"parent": 1, "blob": wrap_generation(a.keyring.entry(1), 2,
                                                                planted).hex()}
    store.put_state(ROOT_KEYS_STATE, json.dumps(doc, sort_keys=True))
    assert doc["2"]["fingerprint"] != fingerprint(planted).hex()
    assert b.follow().added == ()
    assert b.keyring.generations == (1,)


def test_a_node_follows_several_steps_but_not_past_a_retired_parent(
        store: Store, tmp_path: Path) -> None:
    a, b = two_nodes(store, tmp_path)
    a.add_generation()
    a.drop_generation(1)
    a.add_generation()  # generation 3, wrapped under 2, which node B has not taken yet
    followed = b.follow()
    assert followed.added == (2, 3) and followed.dropped == (1,)
    assert b.keyring.active_generation == 3 and not followed.behind
    for step in (2, 3):
        a.drop_generation(step)
        a.add_generation()
    a.drop_generation(4)  # live now: 5 only, wrapped under 4, which is retired
    followed = b.follow()
    assert followed.added == () and followed.behind
    assert b.keyring.active_generation == 3  # behind: it needs a peer or the password
    c = node(store, tmp_path / "c")
    with pytest.raises(errors.NotReady):
        c.follow()  # a sealed node follows nothing


def test_postgres_announces_changes_of_the_followed_records(pg_dsn: str) -> None:
    first = open_store("postgres", dsn=pg_dsn)
    second = open_store("postgres", dsn=pg_dsn)
    try:
        assert second.wait_for_state_change({ROOT_KEYS_STATE}, 0) is False  # now listening
        first.put_state("unrelated", "1")
        first.put_state(ROOT_KEYS_STATE, "{}")
        # Returns at the notification (the timeout is only a bound for a broken build).
        assert second.wait_for_state_change({ROOT_KEYS_STATE}, 300) is True
        first.put_state("unrelated", "2")
        assert second.wait_for_state_change({ROOT_KEYS_STATE}, 0.2) is False
        assert first.swap_state(ROOT_KEYS_STATE, "{}", '{"1": {}}')
        assert second.wait_for_state_change({ROOT_KEYS_STATE}, 300) is True
    finally:
        first.close()
        second.close()


def test_sqlite_cannot_tell_and_says_so(store: Store) -> None:
    assert store.wait_for_state_change({ROOT_KEYS_STATE}, 0) is False
