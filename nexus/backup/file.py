"""Atomic, durable storage of the encrypted backup file.

``write_backup_file`` writes to a temporary file in the same directory (mode 0600), fsyncs it,
keeps the current file as ``<file>.prev`` (a hard link, so the current file never disappears),
renames the temporary file over the target and fsyncs the directory. A crash at any point leaves
either the old or the new backup in place, and the previous good copy stays available.

This module only moves opaque bytes: the caller hands it the already-encrypted backup.
``MAX_BACKUP_SIZE`` bounds both the file and what the parser (:mod:`nexus.backup.format`)
accepts.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

__all__ = [
    "MAX_BACKUP_SIZE",
    "BackupFileError",
    "previous_path",
    "read_backup_file",
    "write_backup_file",
]

MAX_BACKUP_SIZE = 1024 * 1024
_FILE_MODE = 0o600


class BackupFileError(OSError):
    """The backup file cannot be used (too large, not a regular file, ...)."""


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where the previous good copy of ``path`` is kept: ``<path>.prev``."""
    p = Path(path)
    return p.with_name(p.name + ".prev")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_backup_file(path: str | os.PathLike[str]) -> bytes:
    """Read the backup file (regular file, not a symlink, at most 1 MiB).

    Raises ``FileNotFoundError`` when absent and :class:`BackupFileError` when unusable.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise BackupFileError(exc.errno, f"cannot open backup file: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BackupFileError("backup path is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BACKUP_SIZE + 1)
    if len(data) > MAX_BACKUP_SIZE:
        raise BackupFileError("backup file is larger than 1 MiB")
    return data


def write_backup_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, keeping the old file as ``<path>.prev``."""
    if not isinstance(data, bytes | bytearray) or not data:
        raise ValueError("backup data must be non-empty bytes")
    if len(data) > MAX_BACKUP_SIZE:
        raise ValueError("backup data is larger than 1 MiB")
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, _FILE_MODE)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)  # the umask may have narrowed it; never widen beyond 0600
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if target.exists():
            _keep_previous(target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _keep_previous(target: Path) -> None:
    prev = previous_path(target)
    prev_tmp = prev.with_name(f".{prev.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        os.link(target, prev_tmp)
    except OSError:
        # No hard links on this file system: fall back to a copy.
        data = read_backup_file(target)
        fd = os.open(prev_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        os.replace(prev_tmp, prev)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(prev_tmp)
        raise
