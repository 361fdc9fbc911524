"""Stores from before authenticated generation records: refused, unless the operator upgrades.

An upgrade must lose no data: a store whose records carry no tag (written before records were
authenticated) is refused with a message naming the way out, ``--authenticate-legacy-records``;
with it, the password that opens the backup vouches for the records, which are tagged at once,
so the flag is needed only once. Stripping tags from an upgraded store is refused again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus.core import errors
from nexus.core.keymanager import KeyManager
from nexus.store import open_store
from tests.harness import (
    DevAgent,
    Nexus,
    close_keys,
    open_keys,
    pilot,
    short_tmpdir,
    start_unsealed,
)

PASSWORD = b"correct horse battery staple orbit"
BACKUP = "root-key.backup"


def manager(tmp: Path, *, upgrade: bool = False) -> KeyManager:
    return open_keys(tmp, upgrade=upgrade)


def strip_tags(db: Path) -> None:
    """The records as a Nexus from before authenticated records wrote them."""
    store = open_store("sqlite", path=db)
    try:
        records = json.loads(store.get_state("root_keys") or "{}")
        for entry in records.values():
            entry.pop("tags", None)
        store.put_state("root_keys", json.dumps(records))
    finally:
        store.close()


def tags_of(db: Path) -> dict[str, object]:
    store = open_store("sqlite", path=db)
    try:
        records = json.loads(store.get_state("root_keys") or "{}")
    finally:
        store.close()
    return {g: v.get("tags") for g, v in records.items() if "retired" not in v}


def legacy_store(tmp: Path) -> dict[int, bytes]:
    keys = manager(tmp)
    keys.init(PASSWORD)
    keys.add_generation()  # a rotation's new key: two live records
    fingerprints = keys.keyring.fingerprints()
    close_keys(keys)
    strip_tags(tmp / "spike.db")
    return fingerprints


def test_a_legacy_store_is_refused_with_the_way_out(tmp_path: Path) -> None:
    legacy_store(tmp_path)
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match="--authenticate-legacy-records"):
        keys.recover(PASSWORD)
    assert not keys.is_unsealed()
    close_keys(keys)


def test_the_upgrade_recovers_and_tags_the_records_once(tmp_path: Path) -> None:
    fingerprints = legacy_store(tmp_path)
    keys = manager(tmp_path, upgrade=True)
    recovery = keys.recover_detailed(PASSWORD)
    assert recovery.legacy_records_authenticated
    assert recovery.keyring.fingerprints() == fingerprints
    close_keys(keys)
    assert all(tags_of(tmp_path / "spike.db").values())
    # Upgraded: the next start needs no flag.
    keys = manager(tmp_path)
    assert not keys.recover_detailed(PASSWORD).legacy_records_authenticated
    close_keys(keys)
    # Stripping the tags again is refused again (without the flag).
    strip_tags(tmp_path / "spike.db")
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid):
        keys.recover(PASSWORD)
    close_keys(keys)


def test_the_upgrade_needs_the_right_password(tmp_path: Path) -> None:
    legacy_store(tmp_path)
    keys = manager(tmp_path, upgrade=True)
    with pytest.raises(errors.WrongPassword):
        keys.recover(b"not the password at all, really")
    close_keys(keys)


def test_the_upgrade_through_a_real_nexus_is_audited(agent: DevAgent) -> None:
    data_dir = short_tmpdir("nxl-")
    su = agent.env("pilot")
    first = start_unsealed(agent, data_dir)
    assert pilot(["secret", "put", "app/kept", "v=value-kept"], su, first).returncode == 0
    first.stop()
    strip_tags(data_dir / "spike.db")
    refused = Nexus(data_dir, agent.env("nexus"))
    try:
        result = pilot(["recover", "--password-stdin"], su, refused,
                       stdin="correct horse battery staple orbit\n")
        assert result.returncode == 8, result.stderr
        assert "--authenticate-legacy-records" in result.stderr
    finally:
        refused.stop()
    upgraded = Nexus(data_dir, agent.env("nexus"), args=["--authenticate-legacy-records"])
    try:
        result = pilot(["recover", "--password-stdin"], su, upgraded,
                       stdin="correct horse battery staple orbit\n")
        assert result.returncode == 0, result.stderr
        got = pilot(["secret", "get", "app/kept", "--field", "v"], su, upgraded)
        assert got.returncode == 0 and got.stdout.strip() == "value-kept", got
    finally:
        upgraded.stop()
    events = [json.loads(line) for line in (data_dir / "audit.jsonl").read_text().splitlines()]
    assert any(e["action"] == "recover.legacy_records" and e["outcome"] == "authenticated"
               for e in events)
