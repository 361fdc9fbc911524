"""Prometheus metrics for Nexus (``--metrics-listen HOST:PORT``; off by default).

State is read from the node *at scrape time* by :class:`NodeCollector`, so the
metrics never hold a second copy of it. Only events that leave no state behind
are counted here: denied calls (the authorization interceptor's ``on_denied``
hook), rotation failures and completions (a rotation listener) and RPC latency
(:mod:`nexus.api.metrics_interceptor`).

No metric carries a secret value, a secret's path, a password or a caller's
SPIFFE ID. Label values are bounded: RPC methods come from the authorization
table (anything else is ``other``), status codes from ``grpc.StatusCode``,
generations only for root keys currently in memory or in the store.

Metric names (prefix ``spike_nexus_``) are listed in ``docs/`` and used by
``deploy/prometheus/alerts.yml``; rename them only together.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_wsgi_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nexus import __version__
from nexus.api.metrics_interceptor import RpcMetricsInterceptor
from nexus.core import rotation as rot
from nexus.core.node import Node, StatusReport
from nexus.core.schedule import NIST_LIMIT
from nexus.crypto.hardening import core_dumps_disabled_now, dumpable_off_now
from spike.errors import SpikeError
from spike.states import BackupStatus, FailureKind, LifecycleState, RotationPhase

log = structlog.get_logger("nexus.metrics")

PREFIX = "spike_nexus"
# Label values, derived from the state sets (spike/states.py).
STATES = tuple(LifecycleState)
BACKUP_STATUSES = tuple(BackupStatus)
ROTATION_PHASES = tuple(RotationPhase)
OTHER = "other"
# Unary RPCs take ~0.6 ms; Recover/Init/ChangePassword run Argon2id (~0.2 s);
# rotation watch streams run for minutes.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)
_STATUS_CODES = frozenset(code.name for code in grpc.StatusCode)


def _gauge(name: str, doc: str, value: float | None = None,
           labels: Collection[str] = ()) -> GaugeMetricFamily:
    if labels:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class NodeCollector:
    """Reads the node when Prometheus scrapes; holds no copy of its state."""

    def __init__(self, node: Node, metrics: NexusMetrics, *, backup_verify_interval: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._node = node
        self._metrics = metrics
        self._verify_interval = backup_verify_interval
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "Nexus version (always 1)",
                                 labels=["version", "store"])
        info.add_metric([__version__, self._node.store_name], 1)
        yield info
        try:
            status = self._node.status()
        except Exception:
            log.exception("metrics: cannot read node status")
            yield _gauge("status_readable", "1 when the last scrape could read the node's "
                         "status (store reachable)", 0)
            return
        yield _gauge("status_readable", "1 when the last scrape could read the node's "
                     "status (store reachable)", 1)
        yield from self._lifecycle(status, now)
        yield from self._hardening(status)
        yield from self._backup(status)
        yield from self._rotation(status)
        yield from self._encryptions(status)
        yield CounterMetricFamily(
            f"{PREFIX}_recover_failures", "Recover attempts with a wrong password since Nexus "
            "started", value=self._node.keys.recover_failures)

    def _lifecycle(self, status: StatusReport, now: float) -> Iterable[Metric]:
        unsealed = status.state == "unsealed"
        yield _gauge("root_key_present", "1 when the root key is in memory (unsealed)",
                     1 if unsealed else 0)
        state = _gauge("state", "Lifecycle state: 1 for the current one", labels=["state"])
        for name in STATES:
            state.add_metric([name], 1 if status.state == name else 0)
        yield state
        yield _gauge("sealed_with_data", "1 when the root key is not in memory although "
                     "Nexus holds data (sealed: needs `spike recover`)",
                     1 if status.state == "sealed" else 0)
        yield _gauge("root_key_generation", "Active root key generation (0 when sealed)",
                     status.generation)
        if status.key_created is not None:
            yield _gauge("root_key_created_timestamp_seconds",
                         "When the active root key was created", status.key_created)
            yield _gauge("root_key_age_seconds", "Age of the active root key",
                         max(0.0, now - status.key_created))
        records = _gauge("records", "Stored records (secret versions and policies) by the "
                         "root key generation they are encrypted under",
                         labels=["generation"])
        for generation, count in sorted(status.records_by_generation.items()):
            records.add_metric([str(generation)], count)
        yield records

    def _hardening(self, status: StatusReport) -> Iterable[Metric]:
        checks = {
            "core_dumps_disabled": status.hardening.core_dumps_disabled
            and core_dumps_disabled_now(),
            "dumpable_off": status.hardening.dumpable_off and dumpable_off_now(),
            # Vacuously 0 while sealed (no key in memory); alerts look at it only unsealed.
            "key_memory_locked": status.hardening.key_memory_locked,
        }
        family = _gauge("hardening", "1 when a process hardening measure is in effect now",
                        labels=["check"])
        for check, ok in checks.items():
            family.add_metric([check], 1 if ok else 0)
        yield family

    def _backup(self, status: StatusReport) -> Iterable[Metric]:
        backup = status.backup
        yield _gauge("backup_present", "1 when the backup file exists", 1 if backup.present else 0)
        family = _gauge("backup_status", "Result of the last backup check: 1 for the current "
                        "status", labels=["status"])
        known = backup.status if backup.status in BACKUP_STATUSES else "unknown"
        for name in BACKUP_STATUSES:
            family.add_metric([name], 1 if known == name else 0)
        yield family
        yield _gauge("backup_last_verified_timestamp_seconds",
                     "When the backup was last checked (0 = never)", backup.last_verified or 0)
        yield _gauge("backup_last_written_timestamp_seconds",
                     "When the backup was last written (0 = unknown)", backup.last_written or 0)
        yield _gauge("backup_verify_interval_seconds",
                     "How often Nexus checks the backup file", self._verify_interval)
        yield _gauge("backup_generations", "Root key generations sealed in the backup",
                     len(backup.generations))

    def _rotation(self, status: StatusReport) -> Iterable[Metric]:
        current = status.rotation
        phase = current.phase if current is not None else RotationPhase.IDLE
        family = _gauge("rotation_phase", "Phase of the current or last rotation: 1 for the "
                        "current one (idle = never rotated)", labels=["phase"])
        for each_phase in ROTATION_PHASES:
            family.add_metric([each_phase], 1 if phase == each_phase else 0)
        yield family
        yield _gauge("rotation_in_progress", "1 while a rotation has not reached a terminal "
                     "phase", 1 if current is not None and not current.terminal else 0)
        failed = current is not None and current.phase == RotationPhase.FAILED
        kinds = _gauge("rotation_failure", "The failed rotation's kind of failure: 1 for it "
                       "(all 0 unless the current or last rotation failed)", labels=["kind"])
        kind = (current.failure_kind if current is not None else "") or FailureKind.INTERNAL
        for each_kind in FailureKind:
            kinds.add_metric([each_kind], 1 if failed and kind == each_kind else 0)
        yield kinds
        yield _gauge("rotation_failure_unsaved", "1 when the rotation failed and the store "
                     "refused to save that (disk full, store down); Nexus keeps retrying",
                     1 if failed and current is not None and current.failure_unsaved else 0)
        try:
            orphaned = self._node.rotation.orphaned()
        except Exception:
            log.exception("metrics: cannot tell whether the rotation has a worker")
            orphaned = False
        yield _gauge("rotation_orphaned", "1 when a rotation of this node is neither "
                     "finished nor driven by a worker while Nexus is unsealed",
                     1 if orphaned else 0)
        progress = _gauge("rotation_records", "Record counts of the current or last rotation",
                          labels=["count"])
        if current is not None:
            for name, value in (("total", current.total), ("done", current.done),
                                ("reencrypted", current.reencrypted),
                                ("skipped", current.skipped), ("failed", current.failed)):
                progress.add_metric([name], value)
            yield _gauge("rotation_from_generation", "Generation the rotation moves away from",
                         current.from_generation)
            yield _gauge("rotation_to_generation", "Generation the rotation moves to",
                         current.to_generation)
            yield _gauge("rotation_started_timestamp_seconds",
                         "When the current or last rotation started", current.started)
            yield _gauge("rotation_updated_timestamp_seconds",
                         "Last progress of the current or last rotation", current.updated)
        yield progress
        last = self._metrics.last_rotation_success(current)
        if last is not None:
            yield _gauge("rotation_last_success_timestamp_seconds",
                         "When a rotation last completed (absent when unknown)", last)
        if status.next_rotation is not None:
            yield _gauge("rotation_next_timestamp_seconds", "When the schedule wants the "
                         "next rotation (absent when sealed or unscheduled)",
                         status.next_rotation)
        yield CounterMetricFamily(f"{PREFIX}_rotation_failures",
                                  "Rotations that ended in the failed phase since Nexus "
                                  "started", value=self._metrics.rotation_failures)

    def _encryptions(self, status: StatusReport) -> Iterable[Metric]:
        if status.schedule is not None:
            yield _gauge("encryptions_rotation_trigger", "Encryptions under one key that "
                         "trigger a scheduled rotation", status.schedule.max_encryptions)
        yield _gauge("encryptions_safe_limit", "NIST SP 800-38D limit of random-nonce "
                     "AES-GCM encryptions under one key", NIST_LIMIT)
        in_memory = set(self._node.keys.keyring.generations)
        try:
            counts = self._node.counter.counts()
        except Exception:
            log.exception("metrics: cannot read encryption counts")
            return
        family = CounterMetricFamily(f"{PREFIX}_encryptions", "Encryptions under each root "
                                     "key generation held in memory (persisted across "
                                     "restarts, best effort)", labels=["generation"])
        for generation in sorted(in_memory):
            family.add_metric([str(generation)], counts.get(generation, 0))
        yield family
        if status.generation:
            yield _gauge("active_key_encryptions", "Encryptions under the active root key",
                         counts.get(status.generation, 0))


class NexusMetrics:
    """Owns a dedicated registry; wire ``on_denied`` and ``interceptor`` into the server."""

    def __init__(self, node: Node, known_methods: Collection[str], *,
                 backup_verify_interval: float) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._node = node
        self._methods = frozenset(known_methods)
        self._lock = threading.Lock()
        self._rotation_failures = 0
        self._last_success: float | None = None
        self._last_phase: tuple[str, str] | None = None
        current = node.rotation.current
        if current is not None:
            self._last_phase = (current.rotation_id, current.phase)
        self._denied = Counter(
            "denied_calls", "Calls the RPC authorization table refused, by method",
            ["method", "reason"], namespace=PREFIX, registry=self.registry)
        self._latency = Histogram(
            "rpc_duration_seconds", "RPC handling time by method and status code",
            ["method", "code"], namespace=PREFIX, buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self.registry.register(NodeCollector(node, self,
                                             backup_verify_interval=backup_verify_interval))
        node.rotation.add_listener(self._on_rotation)
        self.interceptor = RpcMetricsInterceptor(self._observe_rpc)

    # ---------------------------------------------------------------- hooks

    def _method(self, method: str) -> str:
        return method if method in self._methods else OTHER

    def on_denied(self, method: str, caller: str, reason: str) -> None:
        """The authorization interceptor's hook; the caller's ID never becomes a label."""
        del reason  # free text; reduced to a bounded label below
        self._denied.labels(self._method(method),
                            "unauthenticated" if not caller else "forbidden").inc()

    def _observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self._latency.labels(self._method(method),
                             code if code in _STATUS_CODES else "UNKNOWN").observe(seconds)

    def _on_rotation(self, state: rot.RotationState) -> None:
        key = (state.rotation_id, state.phase)
        with self._lock:
            if key == self._last_phase:
                return  # progress inside the same phase
            self._last_phase = key
            if state.phase == RotationPhase.FAILED:
                self._rotation_failures += 1
            elif state.phase == RotationPhase.COMPLETED:
                self._last_success = state.updated

    # ---------------------------------------------------------------- read by the collector

    @property
    def rotation_failures(self) -> int:
        return self._rotation_failures

    def last_rotation_success(self, current: rot.RotationState | None) -> float | None:
        """The completed rotation's time: from the persisted state when the last rotation
        completed, else from what this process saw (unknown after a restart mid-rotation)."""
        if current is not None and current.phase == RotationPhase.COMPLETED:
            return current.updated
        return self._last_success

    # ---------------------------------------------------------------- HTTP endpoint

    def serve(self, listen: str) -> MetricsEndpoint:
        return MetricsEndpoint.start(listen, self.registry)


class MetricsEndpoint:
    """The /metrics HTTP server (prometheus-client's WSGI server, in a daemon thread)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, address: str) -> None:
        self._server = server
        self._thread = thread
        self.address = address

    @classmethod
    def start(cls, listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise SpikeError(f"--metrics-listen must be HOST:PORT, got {listen!r}")
        host = host.strip("[]") or "127.0.0.1"
        try:
            server, thread = start_wsgi_server(int(port), addr=host, registry=registry)
        except OSError as exc:
            raise SpikeError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
        bound = server.server_address[1]
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        log.info("metrics listening", address=address)
        return cls(server, thread, address)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
