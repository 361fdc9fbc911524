"""The Nexus node: composes key manager, store and services for the API layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nexus import __version__


@dataclass(frozen=True)
class HardeningStatus:
    core_dumps_disabled: bool = False
    dumpable_off: bool = False
    key_memory_locked: bool = False


@dataclass(frozen=True)
class BackupStatus:
    present: bool
    path: str
    status: str
    detail: str = ""
    last_written: float | None = None
    last_verified: float | None = None
    generations: tuple[int, ...] = ()
    kdf: str = ""


@dataclass(frozen=True)
class StatusReport:
    state: str
    generation: int
    fingerprint: str
    key_created: float | None
    hardening: HardeningStatus
    backup: BackupStatus
    version: str = __version__
    store: str = ""
    records_by_generation: dict[int, int] = field(default_factory=dict)


class Node:
    """Foundation stage: knows only whether a backup exists."""

    def __init__(self, backup_path: Path, store_name: str, hardening: HardeningStatus) -> None:
        self._backup_path = backup_path
        self._store_name = store_name
        self._hardening = hardening

    @property
    def state(self) -> str:
        return "sealed" if self._backup_path.exists() else "uninitialized"

    def is_unsealed(self) -> bool:
        return self.state == "unsealed"

    def sealed_message(self) -> tuple[str, str]:
        if self.state == "uninitialized":
            return "uninitialized", "Nexus is not initialized: run `spike init`"
        return "sealed", "Nexus is sealed: run `spike recover` with the administrator password"

    def status(self) -> StatusReport:
        present = self._backup_path.exists()
        return StatusReport(
            state=self.state,
            generation=0,
            fingerprint="",
            key_created=None,
            hardening=self._hardening,
            backup=BackupStatus(
                present=present, path=str(self._backup_path),
                status="unknown" if present else "missing",
            ),
            store=self._store_name,
        )

    def close(self) -> None:
        pass
