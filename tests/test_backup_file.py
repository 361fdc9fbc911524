"""Atomic backup file writes with the previous copy kept."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import nexus.backup.file as bf
from nexus.backup.file import (
    BackupFileError,
    previous_path,
    read_backup_file,
    write_backup_file,
)


def test_write_then_read_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "backup.json"
    write_backup_file(target, b"first")
    assert read_backup_file(target) == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not previous_path(target).exists()


def test_previous_copy_kept(tmp_path: Path) -> None:
    target = tmp_path / "backup.json"
    write_backup_file(target, b"first")
    write_backup_file(target, b"second")
    assert read_backup_file(target) == b"second"
    assert read_backup_file(previous_path(target)) == b"first"
    write_backup_file(target, b"third")
    assert read_backup_file(previous_path(target)) == b"second"
    assert stat.S_IMODE(previous_path(target).stat().st_mode) == 0o600
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.json", "backup.json.prev"]


def test_failed_write_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "backup.json"
    write_backup_file(target, b"good")

    def boom(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_backup_file(target, b"new")
    monkeypatch.undo()
    assert read_backup_file(target) == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["backup.json"]


def test_refuses_empty_and_oversized(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_backup_file(tmp_path / "b", b"")
    with pytest.raises(ValueError):
        write_backup_file(tmp_path / "b", b"x" * (bf.MAX_BACKUP_SIZE + 1))


def test_read_refuses_symlink_large_and_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_backup_file(tmp_path / "missing")
    real = tmp_path / "real"
    real.write_bytes(b"x")
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(BackupFileError):
        read_backup_file(link)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (bf.MAX_BACKUP_SIZE + 1))
    with pytest.raises(BackupFileError):
        read_backup_file(big)
    with pytest.raises(BackupFileError):
        read_backup_file(tmp_path)


def test_umask_does_not_widen(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_backup_file(tmp_path / "b", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600
