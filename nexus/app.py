"""The composition root: one function builds a Nexus from its configuration.

``build`` opens the store and the audit trail, builds the key manager and the node (secrets,
policies, counter, rotation engine, scheduler), the metrics when configured, and the gRPC
server with its servicers when given an identity. ``nexus/__main__.py`` serves what it builds;
the tests build the same object graph in process (with their own store, clock or sleep).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nexus.audit import AuditLog
from nexus.config import NexusConfig
from nexus.core.cluster import HEARTBEAT_INTERVAL, NodeRegistry
from nexus.core.counter import EncryptionCounter
from nexus.core.keymanager import KeyManager
from nexus.core.node import Node, NodeServices
from nexus.core.policies import PolicyEngine
from nexus.core.rotation import PEER_WAIT, STALE_NODE_GRACE, RotationEngine
from nexus.core.schedule import Scheduler
from nexus.core.secrets import SecretsService
from nexus.crypto.hardening import HardeningReport
from nexus.crypto.kdf import KdfParams
from nexus.store.base import Store
from spike.errors import SpikeError
from spike.identity import IdentitySource
from spike.roles import superuser_id

if TYPE_CHECKING:
    from nexus.api.server import NexusServer
    from nexus.limits import ConnectionLimits
    from nexus.metrics import MetricsEndpoint, NexusMetrics

# What a process that did not harden itself reports (tests building Nexus in process).
UNHARDENED = HardeningReport(core_dumps_disabled=False, dumpable_off=False,
                             mlock_available=False)


def default_node_name(config: NexusConfig) -> str:
    """Stable across restarts of the same node; distinct for nodes sharing a store."""
    return f"{socket.gethostname()}:{config.data_dir.resolve()}"


def kdf_params(config: NexusConfig) -> KdfParams:
    """The Argon2id parameters for new backups; production costs unless the test flag is set."""
    if config.insecure_test_kdf:
        return KdfParams.insecure_for_tests()
    params = KdfParams(time_cost=config.kdf_time_cost, memory_kib=config.kdf_memory_kib,
                       parallelism=config.kdf_parallelism)
    try:
        params.require_production()
    except ValueError as exc:
        raise SpikeError(f"invalid Argon2id parameters: {exc}") from None
    return params


def open_configured_store(config: NexusConfig) -> Store:
    from nexus.store import open_store
    from nexus.store.base import StoreError

    try:
        if config.store == "postgres":
            return open_store("postgres", dsn=config.dsn)
        return open_store("sqlite", path=config.sqlite_path,
                          group_commit=config.group_commit)
    except StoreError as exc:
        raise SpikeError(f"cannot open the {config.store} store: {exc}") from None


def build_keys(config: NexusConfig, store: Store, *,
               clock: Callable[[], float] = time.time,
               wrong_password_delay_cap: float | None = None) -> KeyManager:
    """The key manager over ``store``: backup file, KDF and password backoff from ``config``.
    ``wrong_password_delay_cap`` (tests only) bounds the held-back wrong answer."""
    extra = ({} if wrong_password_delay_cap is None
             else {"wrong_password_delay_cap": wrong_password_delay_cap})
    return KeyManager(store, config.backup_path, kdf_params(config),
                      allow_insecure_kdf=config.insecure_test_kdf,
                      backoff_base=config.recover_backoff_seconds, clock=clock,
                      authenticate_legacy_records=config.authenticate_legacy_records, **extra)


def build_services(config: NexusConfig, store: Store, keys: KeyManager, audit: AuditLog, *,
                   clock: Callable[[], float] = time.time,
                   sleep: Callable[[float], None] = time.sleep,
                   registry: NodeRegistry | None = None) -> NodeServices:
    """The node's services, built in the order their unseal listeners must run (the secrets'
    generation-cell check before the rotation engine resumes)."""
    counter = EncryptionCounter(store)
    policies = PolicyEngine(store, keys, superuser_id(config.trust_domain), counter)
    secrets = SecretsService(store, keys, policies, counter,
                             max_versions=config.max_secret_versions,
                             max_value_bytes=config.max_value_bytes, audit=audit)
    shared = config.store == "postgres"
    rotation = RotationEngine(store, keys, counter, audit,
                              data_dir=config.data_dir if config.store == "sqlite" else None,
                              node_name=config.node_name or default_node_name(config),
                              stale_node_grace=STALE_NODE_GRACE if shared else 0.0,
                              peers=registry.live_peers if shared and registry else None,
                              peer_wait=registry.lease if registry else PEER_WAIT,
                              sleep=sleep)
    scheduler = Scheduler(store, keys, rotation, counter, clock=clock,
                          check_every=max(config.scheduler_check_seconds, 1.0))
    return NodeServices(counter, policies, secrets, rotation, scheduler)


@dataclass
class NexusApp:
    """A built Nexus: its parts, and the order they start and stop in."""

    config: NexusConfig
    store: Store
    audit: AuditLog
    keys: KeyManager
    node: Node
    metrics: NexusMetrics | None = None
    server: NexusServer | None = None
    _endpoint: MetricsEndpoint | None = field(default=None, repr=False)

    @property
    def secrets(self) -> SecretsService:
        return self.node.secrets

    @property
    def policies(self) -> PolicyEngine:
        return self.node.policies

    @property
    def counter(self) -> EncryptionCounter:
        return self.node.counter

    @property
    def rotation(self) -> RotationEngine:
        return self.node.rotation

    @property
    def scheduler(self) -> Scheduler:
        return self.node.scheduler

    def start(self) -> None:
        """Start the node's background work, the metrics endpoint and the gRPC server."""
        self.node.start()
        if self.metrics is not None and self.config.metrics_listen:
            self._endpoint = self.metrics.serve(self.config.metrics_listen)
        if self.server is not None:
            self.server.start()
            if not self.config.advertise_address:
                self.node.registry.address = self.server.address  # the port as bound
                self.node.registry.report()

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop serving and close the node (the audit trail stays open for a last record)."""
        self.rotation.shutdown()  # checkpoint; ends watch streams
        if self.server is not None:
            self.server.stop(grace=grace)
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        self.node.close()

    def close(self) -> None:
        """``shutdown``, then close the audit trail."""
        self.shutdown()
        self.audit.close()


def build(
    config: NexusConfig,
    *,
    identity: IdentitySource | None = None,
    limits: ConnectionLimits | None = None,
    hardening: HardeningReport = UNHARDENED,
    store: Store | None = None,
    audit: AuditLog | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> NexusApp:
    """Build every part of a Nexus from ``config``; nothing is started.

    The gRPC server (and the metrics, when ``config.metrics_listen`` is set) is built only with
    an ``identity`` to serve as. ``store`` and ``audit`` default to the configured ones (a test
    may pass its own, e.g. a store that injects failures); ``clock`` is the key manager's
    (password backoff) and the scheduler's, ``sleep`` the rotation engine's (throttling
    pauses)."""
    store = store if store is not None else open_configured_store(config)
    audit = audit if audit is not None else AuditLog(config.audit_target)
    keys = build_keys(config, store, clock=clock)
    shared = config.store == "postgres"
    registry = NodeRegistry(store, keys, name=config.node_name or default_node_name(config),
                            address=config.advertise_address or config.listen, clock=clock,
                            interval=HEARTBEAT_INTERVAL if shared else None,
                            lease=config.node_lease_seconds)
    services = build_services(config, store, keys, audit, clock=clock, sleep=sleep,
                              registry=registry)
    node = Node(store, config.store, keys, audit, hardening, str(config.backup_path),
                services, backup_verify_interval=config.backup_verify_interval_seconds,
                scheduler_enabled=config.scheduler_check_seconds > 0,
                follow_keyring=config.store == "postgres", registry=registry)
    app = NexusApp(config, store, audit, keys, node)
    if identity is not None:
        _build_serving(app, identity, limits)
    return app


def _build_serving(app: NexusApp, identity: IdentitySource,
                   limits: ConnectionLimits | None) -> None:
    from nexus.api.server import NexusServer

    config = app.config
    if config.metrics_listen:
        from nexus.api.authz import rpc_rules
        from nexus.metrics import NexusMetrics

        app.metrics = NexusMetrics(app.node, rpc_rules(config.trust_domain),
                                   backup_verify_interval=config.backup_verify_interval_seconds)
    metrics = app.metrics
    app.server = NexusServer(config, app.node, identity, app.audit,
                             interceptors=[metrics.interceptor] if metrics else [],
                             denied_hooks=[metrics.on_denied] if metrics else [],
                             limits=limits)
    app.node.on_state_change(app.server.update_health)
