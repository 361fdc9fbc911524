"""Recovering from a backup made before a password change needs explicit consent (issue 11,
item 12).

Such a backup opens with the old password, and recovering from it used to re-seal the server's
backup under that old password silently. It is now refused (exit 8, without counting a failed
attempt: the password was right) unless the operator passes ``--accept-old-password``; a
recovery with that consent is audited.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nexus.core import errors
from nexus.core.keymanager import KeyManager
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

OLD = TEST_PASSWORD.encode()
NEW = b"violet anchor drizzle quantum ferry"
EARLIER = "earlier administrator password"


def manager(tmp: Path) -> KeyManager:
    return open_keys(tmp, backoff=30.0)


def changed_password(tmp: Path) -> bytes:
    """init under OLD, keep a copy, change the password to NEW, stop; return the old copy."""
    keys = manager(tmp)
    keys.init(OLD)
    before = (tmp / "root-key.backup").read_bytes()
    keys.change_password(OLD, NEW)
    close_keys(keys)
    return before


def test_an_export_from_before_a_password_change_is_refused(tmp_path: Path) -> None:
    before = changed_password(tmp_path)
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match=EARLIER):
        keys.recover(OLD, before)
    assert not keys.is_unsealed()
    assert keys.recover_failures == 0  # the password was right: not a failed attempt
    # The current backup opens with the new password at once (no backoff).
    keys.recover(NEW)
    close_keys(keys)


def test_the_server_file_replaced_by_its_prev_copy_is_refused(tmp_path: Path) -> None:
    changed_password(tmp_path)
    path = tmp_path / "root-key.backup"
    shutil.copyfile(tmp_path / "root-key.backup.prev", path)  # sealed under OLD
    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match=EARLIER):
        keys.recover(OLD)
    close_keys(keys)


def test_with_consent_it_recovers_and_reports_it(tmp_path: Path) -> None:
    before = changed_password(tmp_path)
    keys = manager(tmp_path)
    recovery = keys.recover_detailed(OLD, before, accept_old_password=True)
    assert recovery.old_password_accepted
    assert recovery.keyring.active_generation == 1
    close_keys(keys)
    # The server's backup is under OLD again, and that is now the recorded state: a plain
    # recover with OLD needs no consent; NEW no longer opens it.
    again = manager(tmp_path)
    with pytest.raises(errors.WrongPassword):
        again.recover(NEW)
    close_keys(again)
    third = manager(tmp_path)
    assert not third.recover_detailed(OLD).old_password_accepted
    close_keys(third)


def test_a_normal_restart_and_a_current_export_need_no_consent(tmp_path: Path) -> None:
    changed_password(tmp_path)
    current = (tmp_path / "root-key.backup").read_bytes()
    keys = manager(tmp_path)
    assert not keys.recover_detailed(NEW).old_password_accepted
    close_keys(keys)
    (tmp_path / "root-key.backup").unlink()
    keys = manager(tmp_path)
    assert not keys.recover_detailed(NEW, current).old_password_accepted
    close_keys(keys)


def test_a_crash_between_writing_and_recording_a_password_change(tmp_path: Path) -> None:
    """The new file was written but its key not yet recorded as current: still accepted."""
    keys = manager(tmp_path)
    keys.init(OLD)
    old_key = state_json(keys._store, "backup_public_key")["current"]
    keys.change_password(OLD, NEW)
    new_key = state_json(keys._store, "backup_public_key")["current"]
    assert new_key != old_key
    # What the store holds if Nexus died right after the file was written:
    keys._store.put_state("backup_public_key",
                          json.dumps({"current": old_key, "pending": new_key}))
    close_keys(keys)
    again = manager(tmp_path)
    assert not again.recover_detailed(NEW).old_password_accepted
    assert state_json(again._store, "backup_public_key") == {"current": new_key}
    close_keys(again)


# ---------------------------------------------------------------- through Pilot


def test_pilot_refuses_then_recovers_with_accept_old_password_and_audits_it(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    old_pw, new_pw = tmp / "old", tmp / "new"
    old_pw.write_text(OLD.decode() + "\n")
    new_pw.write_text(NEW.decode() + "\n")
    su = agent.env("pilot")
    nexus = Nexus(data_dir, agent.env("nexus"), args=["--recover-backoff-seconds", "0.05"])
    try:
        pilot_json(["init", "--password-file", str(old_pw), "--output", "json"], su, nexus)
        export = tmp / "before-change.backup"
        pilot_json(["backup", "export", "--out", str(export), "--output", "json"], su, nexus)
        changed = pilot(["password", "change", "--password-file", str(old_pw),
                         "--new-password-file", str(new_pw)], su, nexus)
        assert changed.returncode == 0, changed
        nexus.kill()
        (data_dir / "root-key.backup").unlink()  # the server's copy is lost
        nexus = Nexus(data_dir, agent.env("nexus"), args=["--recover-backoff-seconds", "0.05"])
        refused = pilot(["recover", "--backup-file", str(export), "--password-file",
                         str(old_pw)], su, nexus)
        assert refused.returncode == 8, refused
        assert EARLIER in refused.stderr and "--accept-old-password" in refused.stderr
        ok = pilot(["recover", "--backup-file", str(export), "--password-file", str(old_pw),
                    "--accept-old-password", "--output", "json"], su, nexus)
        assert ok.returncode == 0, ok
        answer = json.loads(ok.stdout.splitlines()[-1])
        assert answer["old_password_accepted"] is True
        assert "spike password change" in ok.stderr
        events = [json.loads(line) for line in
                  (data_dir / "audit.jsonl").read_text().splitlines() if line.strip()]
        recovers = [(e["action"], e["outcome"]) for e in events
                    if e["action"].startswith("recover")]
        assert recovers == [("recover", "old_password_backup"),
                            ("recover.old_password", "accepted"), ("recover", "ok")], recovers
        consent = [e for e in events if e["action"] == "recover" and e["outcome"] == "ok"]
        assert consent[0]["detail"]["accept_old_password"] is True
    finally:
        nexus.stop()
