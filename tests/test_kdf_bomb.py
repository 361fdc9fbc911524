"""A "KDF bomb": a backup whose Argon2id costs are absurd for this Nexus (issue 11, item 7).

While Nexus is sealed the recover role may send any backup. One with m = 4 GiB used to cost
4 GiB of RAM and seconds under the lifecycle lock, and then counted as a wrong password, so the
superuser's real recovery hit the backoff. The costs are now bounded relative to the configured
ones before Argon2 runs; such a backup is an invalid backup (exit 8), not a wrong password.

These tests are self-contained (no helper of this change is imported), so that they run against
the code before the fix too: there they fail because Argon2 runs (the tests replace it with a
tripwire) or because the refused backup counted as a wrong password.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from nexus.backup.format import Backup
from nexus.core import errors
from nexus.core.keymanager import KeyManager
from nexus.crypto import kdf
from nexus.crypto.kdf import KdfParams
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, open_keys, pilot, pilot_json

PASSWORD = TEST_PASSWORD.encode()
GIB_KIB = 1024 * 1024

# Each is within KdfParams' absolute sanity bounds (so the old code ran Argon2 on it) but far
# above what a Nexus configured with the test (or the default) parameters should accept.
BOMBS: dict[str, dict[str, Any]] = {
    "memory 4 GiB": {"memory_kib": 4 * GIB_KIB, "time_cost": 3, "parallelism": 4},
    "time cost 64": {"memory_kib": 64, "time_cost": 64, "parallelism": 1},
    "parallelism 64": {"memory_kib": 64 * 8, "time_cost": 1, "parallelism": 64},
    "work 1 GiB x 8": {"memory_kib": GIB_KIB, "time_cost": 8, "parallelism": 4},
}


def bomb(data: bytes, **costs: int) -> bytes:
    """The same backup with other KDF costs and a recomputed checksum (it needs no key)."""
    backup = Backup.parse(data, allow_insecure_kdf_for_tests=True)
    params = dataclasses.replace(backup.params, insecure_for_tests_only=False, **costs)
    return dataclasses.replace(backup, params=params).to_bytes()


@pytest.fixture()
def tripwire(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace Argon2 by a recorder for bomb costs (a real 4 GiB run must never happen here)."""
    runs: list[int] = []
    real = kdf._argon2id_into

    def guarded(out: object, password: object, salt: object, **kw: int) -> None:
        if kw["memory_kib"] > 64 * 8 or kw["time_cost"] > 1 or kw["parallelism"] > 1:
            runs.append(kw["memory_kib"])
            raise AssertionError(f"Argon2 ran with a bomb's costs: {kw}")
        real(out, password, salt, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kdf, "_argon2id_into", guarded)
    return runs


def manager(tmp: Path, backoff: float = 30.0) -> KeyManager:
    return open_keys(tmp, backoff=backoff)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_an_exported_bomb_is_an_invalid_backup_and_costs_no_argon2(
    tmp_path: Path, tripwire: list[int], name: str
) -> None:
    first = manager(tmp_path)
    first.init(PASSWORD)
    data = (tmp_path / "root-key.backup").read_bytes()
    first.seal()
    first._store.close()

    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match="bound"):
        keys.recover(PASSWORD, bomb(data, **BOMBS[name]))
    assert tripwire == []
    assert keys.recover_failures == 0
    # Not a wrong password: the real recovery right after is not held up by a backoff.
    keyring = keys.recover(PASSWORD)
    assert keyring.active_generation == 1


def test_a_bomb_as_the_server_file_is_invalid_too(tmp_path: Path, tripwire: list[int]) -> None:
    first = manager(tmp_path)
    first.init(PASSWORD)
    path = tmp_path / "root-key.backup"
    good = path.read_bytes()
    first.seal()
    first._store.close()
    path.write_bytes(bomb(good, **BOMBS["memory 4 GiB"]))

    keys = manager(tmp_path)
    with pytest.raises(errors.BackupInvalid, match="bound"):
        keys.recover(PASSWORD)
    assert tripwire == [] and keys.recover_failures == 0
    assert keys.verify_backup_file().status == "corrupt"
    keys.recover(PASSWORD, good)


def test_backup_verify_refuses_a_bomb_in_the_file(tmp_path: Path, tripwire: list[int]) -> None:
    keys = manager(tmp_path)
    keys.init(PASSWORD)
    path = tmp_path / "root-key.backup"
    path.write_bytes(bomb(path.read_bytes(), **BOMBS["time cost 64"]))
    with pytest.raises(errors.BackupInvalid, match="bound"):
        keys.verify_with_password(PASSWORD)
    assert tripwire == [] and keys.recover_failures == 0


def test_an_exported_bomb_is_refused_without_waiting_for_the_lifecycle_lock(
    tmp_path: Path, tripwire: list[int]
) -> None:
    first = manager(tmp_path)
    first.init(PASSWORD)
    data = (tmp_path / "root-key.backup").read_bytes()
    first.seal()
    first._store.close()
    keys = manager(tmp_path)

    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with keys._lock:
            holding.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            keys.recover(PASSWORD, bomb(data, **BOMBS["memory 4 GiB"]))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(60)  # a generous deadline: the refusal needs no lock at all
    finished = not worker.is_alive()
    release.set()
    holder.join()
    worker.join(60)
    assert finished, "the bomb waited for the lifecycle lock"
    assert len(outcome) == 1 and isinstance(outcome[0], errors.BackupInvalid), outcome


def test_the_default_bound() -> None:
    bound = kdf.KdfBound.for_configured(KdfParams())
    assert (bound.max_memory_kib, bound.max_time_cost, bound.max_parallelism) == (
        GIB_KIB, 12, 16)
    assert bound.max_work_kib == 3 * GIB_KIB
    bound.check(KdfParams())  # our own parameters always pass
    bound.check(KdfParams(memory_kib=GIB_KIB, time_cost=3, parallelism=4))
    bound.check(KdfParams(memory_kib=256 * 1024, time_cost=12, parallelism=16))
    big = kdf.KdfBound.for_configured(KdfParams(memory_kib=2 * GIB_KIB, time_cost=2))
    assert big.max_memory_kib == kdf.MAX_MEMORY_KIB  # 4x 2 GiB, capped at the absolute 4 GiB
    for costs in BOMBS.values():
        with pytest.raises(ValueError, match="bound"):
            bound.check(KdfParams(**costs))


# ---------------------------------------------------------------- real processes


def test_recover_role_bomb_then_superuser_recovers_at_once(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    pw = tmp / "pw"
    pw.write_text(TEST_PASSWORD + "\n")
    args = ["--recover-backoff-seconds", "60"]  # a counted failure would block the next try
    nexus = Nexus(data_dir, agent.env("nexus"), args=args)
    try:
        pilot_json(["init", "--password-file", str(pw), "--output", "json"],
                   agent.env("pilot"), nexus)
        nexus.kill()
        nexus = Nexus(data_dir, agent.env("nexus"), args=args)
        # Cheap to run even where it is not refused (t=9, m=64 KiB), but above the bound
        # of a Nexus with the test parameters (t <= 8).
        hostile = tmp / "bomb.backup"
        hostile.write_bytes(bomb((data_dir / "root-key.backup").read_bytes(),
                                 memory_kib=64, time_cost=9, parallelism=1))
        refused = pilot(["recover", "--backup-file", str(hostile), "--password-file", str(pw)],
                        agent.env("recover"), nexus)
        assert refused.returncode == 8, refused
        assert "invalid" in refused.stderr and "bound" in refused.stderr, refused.stderr
        assert "password does not open" not in refused.stderr
        ok = pilot(["recover", "--password-file", str(pw), "--output", "json"],
                   agent.env("pilot"), nexus)
        assert ok.returncode == 0, ok
    finally:
        nexus.stop()
