"""The Nexus node: composes store, key manager and services for the API layer."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from nexus import __version__
from nexus.audit import AuditLog
from nexus.core.cluster import NODE_LEASE, NodeRecord, NodeRegistry
from nexus.core.counter import EncryptionCounter
from nexus.core.follower import KeyringFollower
from nexus.core.keymanager import KeyManager
from nexus.core.policies import PolicyEngine
from nexus.core.rotation import RotationEngine, RotationState
from nexus.core.schedule import Schedule, Scheduler
from nexus.core.secrets import SecretsService
from nexus.crypto.hardening import HardeningReport
from nexus.store.base import Store
from spike.states import BackupStatus, LifecycleState

NO_BACKUP_YET = "not initialized yet: `spike init` makes the root key and writes the backup"
log = structlog.get_logger("nexus.node")


@dataclass(frozen=True)
class HardeningStatus:
    core_dumps_disabled: bool = False
    dumpable_off: bool = False
    key_memory_locked: bool = False


@dataclass(frozen=True)
class BackupReport:
    present: bool
    path: str
    status: BackupStatus
    detail: str = ""
    last_written: float | None = None
    last_verified: float | None = None
    generations: tuple[int, ...] = ()
    kdf: str = ""


@dataclass(frozen=True)
class StatusReport:
    state: LifecycleState
    generation: int
    fingerprint: str
    key_created: float | None
    hardening: HardeningStatus
    backup: BackupReport
    version: str = __version__
    store: str = ""
    records_by_generation: dict[int, int] = field(default_factory=dict)
    rotation: RotationState | None = None
    schedule: Schedule | None = None
    next_rotation: float | None = None
    nodes: tuple[NodeRecord, ...] = ()
    this_node: str = ""
    node_lease: float = NODE_LEASE


@dataclass(frozen=True)
class NodeServices:
    """The core services a node serves, built over its store and key manager (nexus/app.py)."""

    counter: EncryptionCounter
    policies: PolicyEngine
    secrets: SecretsService
    rotation: RotationEngine
    scheduler: Scheduler


class Node:
    def __init__(
        self,
        store: Store,
        store_name: str,
        keys: KeyManager,
        audit: AuditLog,
        hardening: HardeningReport,
        backup_path: str,
        services: NodeServices,
        backup_verify_interval: float = 3600.0,
        *,
        scheduler_enabled: bool = True,
        follow_keyring: bool = False,
        registry: NodeRegistry | None = None,
    ) -> None:
        self.store = store
        self.counter = services.counter
        self.policies = services.policies
        self.secrets = services.secrets
        self.rotation = services.rotation
        self.scheduler = services.scheduler
        self._scheduler_enabled = scheduler_enabled
        self.store_name = store_name
        self.keys = keys
        self.audit = audit
        self._hardening = hardening
        self._backup_path = backup_path
        self._stop = threading.Event()
        self._state_listeners: list[Callable[[], None]] = []
        self._verifier = threading.Thread(
            target=self._verify_loop, args=(backup_verify_interval,), daemon=True,
            name="backup-verify",
        )
        # Several nodes on one store: follow the others' rotations (nexus/core/follower.py).
        self.follower = KeyringFollower(keys, store) if follow_keyring else None
        self.registry = registry or NodeRegistry(store, keys, name="nexus")
        keys.on_unsealed(self._on_unsealed)
        keys.on_keys_changed(self._keys_changed)

    def start(self) -> None:
        self._verifier.start()
        self.registry.start()
        if self.follower is not None:
            self.follower.start()
        if self._scheduler_enabled:
            self.scheduler.start()

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> LifecycleState:
        return self.keys.state

    @property
    def backup_path(self) -> str:
        """Where the backup file is (no status, no store query: what Init answers with)."""
        return self._backup_path

    def is_unsealed(self) -> bool:
        return self.keys.is_unsealed()

    def sealed_message(self) -> tuple[LifecycleState, str]:
        return self.keys.sealed_message()

    def on_state_change(self, listener: Callable[[], None]) -> None:
        self._state_listeners.append(listener)

    def _on_unsealed(self) -> None:
        for listener in self._state_listeners:
            listener()
        self._keys_changed()
        self.rotation.resume_after_unseal()

    def _keys_changed(self) -> None:
        """Tell the other nodes at once (not at the next heartbeat) what this one holds."""
        self.registry.report()

    def nodes(self) -> list[NodeRecord]:
        """Every node sharing the store, as each last reported (this one included)."""
        try:
            # This node's own row as it is now, not as of its last heartbeat.
            mine = self.registry.mine()
            others = [n for n in self.registry.nodes() if n.name != mine.name]
            return sorted([mine, *others], key=lambda n: n.name)
        except Exception as exc:
            log.warning("could not read the node list", error_type=type(exc).__name__)
            return []

    # ------------------------------------------------------------------ backup checks

    def _verify_loop(self, interval: float) -> None:
        # The loop survives any error of a check: a dead verifier would leave status
        # reporting the last result for ever.
        self._verify_logged()
        while not self._stop.wait(interval):
            self._verify_logged()

    def _verify_logged(self) -> None:
        try:
            self.verify_backup_now()
        except Exception as exc:
            # The type and place only: the text of a lower layer's error may quote the file.
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
            log.error("backup check failed with an error", error_type=type(exc).__name__,
                      where=where)
            health = self.keys.backup_health
            health.status = BackupStatus.UNKNOWN
            health.detail = f"the last check failed ({type(exc).__name__}): see the Nexus log"

    def verify_backup_now(self) -> None:
        if self.keys.state == LifecycleState.UNINITIALIZED:
            # No backup is expected before `spike init`: nothing failed, nothing was verified.
            return
        before = self.keys.backup_health.status
        health = self.keys.verify_backup_file()
        if health.status != before or health.status != BackupStatus.OK:
            self.audit.record("backup.check", caller="(nexus)", outcome=str(health.status),
                              detail_text=health.detail)

    def _backup_health_now(self) -> None:
        """Re-check the file when it changed since its last check (deleted, replaced,
        edited): cheap (a stat), so status always tells the truth about the file."""
        if self.keys.backup_file_changed():
            self._verify_logged()

    # ------------------------------------------------------------------ status

    def status(self) -> StatusReport:
        keyring = self.keys.keyring
        generation = keyring.active_generation or 0
        recorded = self.keys.generations_recorded()
        info = recorded.get(generation)
        self._backup_health_now()
        health = self.keys.backup_health
        state = self.keys.state
        try:
            counts = self.store.count_by_generation()
        except Exception:
            counts = {}
        return StatusReport(
            state=state,
            generation=generation,
            fingerprint=keyring.entry(generation).fingerprint_hex if generation else "",
            key_created=info.created if info else None,
            hardening=HardeningStatus(
                core_dumps_disabled=self._hardening.core_dumps_disabled,
                dumpable_off=self._hardening.dumpable_off,
                key_memory_locked=bool(generation) and keyring.all_locked,
            ),
            backup=BackupReport(
                present=os.path.exists(self._backup_path),
                path=self._backup_path,
                status=health.status,
                detail=NO_BACKUP_YET if state == LifecycleState.UNINITIALIZED else health.detail,
                last_written=health.last_written,
                last_verified=health.last_verified,
                generations=self.keys.backup_generations(),
                kdf=self.keys.kdf_description(),
            ),
            store=self.store_name,
            records_by_generation=counts,
            rotation=self.rotation.current,
            schedule=self.scheduler.get(),
            next_rotation=self.scheduler.next_rotation() if generation else None,
            nodes=tuple(self.nodes()),
            this_node=self.registry.name,
            node_lease=self.registry.lease,
        )

    def close(self) -> None:
        self._stop.set()
        if self.follower is not None:
            self.follower.stop()
        self.registry.stop()
        self.scheduler.stop()
        self.rotation.shutdown()
        try:
            self.counter.flush()
        except Exception:
            log.exception("could not persist encryption counts")
        self.keys.seal()
        self.store.close()
