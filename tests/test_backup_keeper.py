"""The key manager's parts: the backup keeper's one "ok" path and one password-open path, the
generation ledger, the typed states, and Init's answer (the backup path, with no status)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nexus.api.operator import OperatorServicer
from nexus.backup.file import MAX_BACKUP_SIZE, read_backup_file
from nexus.backup.format import Backup, BackupCorrupt
from nexus.core import errors
from nexus.core.ledger import GenerationLedger
from spike.errors import ErrorKind
from spike.states import BackupStatus, LifecycleState
from spike.v1 import operator_pb2 as pb
from tests.harness import close_keys, open_keys

PASSWORD = b"correct horse battery staple orbit"
WRONG = b"a wrong but acceptable password here"


def test_one_size_limit_for_the_file_and_the_parser(tmp: Path) -> None:
    too_big = tmp / "big.backup"
    too_big.write_bytes(b" " * (MAX_BACKUP_SIZE + 1))
    with pytest.raises(OSError, match="larger than 1 MiB"):
        read_backup_file(too_big)
    with pytest.raises(BackupCorrupt, match="too large"):
        Backup.parse(b" " * (MAX_BACKUP_SIZE + 1))


def test_lifecycle_and_backup_states_are_the_enums(tmp: Path) -> None:
    keys = open_keys(tmp)
    try:
        # Read into locals: asserting on the attributes would narrow them past init for mypy.
        state, backup = keys.state, keys.backup_health.status
        assert state is LifecycleState.UNINITIALIZED
        assert backup is BackupStatus.MISSING
        with pytest.raises(errors.NotReady) as refused:
            keys.require_unsealed()
        assert refused.value.kind == ErrorKind.UNINITIALIZED
        keys.init(PASSWORD)
        assert keys.state is LifecycleState.UNSEALED
        assert keys.backup_health.status is BackupStatus.OK
        keys.backup_path.unlink()
        assert keys.backup_file_changed()
        assert keys.verify_backup_file().status is BackupStatus.MISSING
    finally:
        close_keys(keys)
    again = open_keys(tmp)
    try:
        assert again.state is LifecycleState.SEALED
        state, message = again.sealed_message()
        assert state is LifecycleState.SEALED and "backup file is missing" in message
    finally:
        close_keys(again)


def test_wrong_password_counts_once_per_attempt_on_both_paths(tmp: Path) -> None:
    """verify and recover open the backup through one path: a wrong password counts (and
    backs off) the same way; their messages stay as documented."""
    keys = open_keys(tmp, backoff=30.0, wrong_password_delay_cap=0.0)
    try:
        keys.init(PASSWORD)
        with pytest.raises(errors.WrongPassword, match="does not open the backup"):
            keys.verify_with_password(WRONG)
        assert keys.recover_failures == 1
        with pytest.raises(errors.TooManyAttempts):
            keys.verify_with_password(PASSWORD)
    finally:
        close_keys(keys)
    sealed = open_keys(tmp, wrong_password_delay_cap=0.0)
    try:
        with pytest.raises(errors.WrongPassword, match="does not open this backup"):
            sealed.recover(WRONG)
        assert sealed.recover_failures == 1
    finally:
        close_keys(sealed)


def test_a_mismatching_backup_is_reported_and_a_good_one_is_ok_again(tmp: Path) -> None:
    keys = open_keys(tmp)
    try:
        keys.init(PASSWORD)
        good = keys.backup_path.read_bytes()
        keys.add_generation()
        keys.backup_path.write_bytes(good)  # generation 1 only: memory holds 1 and 2
        with pytest.raises(errors.BackupInvalid, match="does not match the keys in memory"):
            keys.verify_with_password(PASSWORD)
        assert keys.backup_health.status is BackupStatus.MISMATCH
        keys.drop_generation(1)  # rewrites the file with generation 2 only
        assert keys.verify_with_password(PASSWORD) == (2,)
        health = keys.backup_health
        assert health.status is BackupStatus.OK and health.detail == ""
    finally:
        close_keys(keys)


def test_the_ledger_records_and_retires_generations(tmp: Path) -> None:
    keys = open_keys(tmp)
    try:
        keys.init(PASSWORD)
        keys.add_generation()
        keys.drop_generation(1)
        ledger = GenerationLedger(keys._store, lambda: 0.0)
        assert set(ledger.recorded()) == {2}
        assert set(ledger.retired()) == {1}
        assert ledger.high_water() == 2
        assert keys.next_generation() == 3
        records = ledger.records()
        assert records["2"]["tags"]  # authenticated under the password's record key
        assert "tags" not in records["1"] and "retired" in records["1"]
    finally:
        close_keys(keys)


class _Context:
    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def abort(self, code: Any, message: str) -> None:
        raise AssertionError(f"Init failed: {code} {message}")


class _Audit:
    def record(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_init_answers_with_the_backup_path_without_computing_a_status(tmp: Path) -> None:
    """Init used to compute a full status (a GROUP BY over every record) to learn a path."""
    keys = open_keys(tmp)

    def no_status() -> None:
        raise AssertionError("Init computed a status")

    node: Any = SimpleNamespace(keys=keys, audit=_Audit(), status=no_status,
                                backup_path=str(keys.backup_path))
    try:
        context: Any = _Context()
        answer = OperatorServicer(node).Init(pb.InitRequest(password=PASSWORD), context)
        assert answer.backup_path == str(keys.backup_path)
        assert answer.root_key_generation == 1
    finally:
        close_keys(keys)
