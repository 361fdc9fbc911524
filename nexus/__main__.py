"""spike-nexus: the composition root — config -> identity -> store -> core -> api -> serve."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import structlog

from nexus.audit import AuditLog
from nexus.config import NexusConfig, load_config
from nexus.core.keymanager import KeyManager
from nexus.core.node import Node
from nexus.crypto.hardening import harden_process
from nexus.crypto.kdf import KdfParams
from nexus.limits import connection_limits, raise_open_file_limit
from nexus.logs import configure_logging
from nexus.store.base import Store
from spike.errors import SpikeError
from spike.identity import IdentitySource

log = structlog.get_logger("nexus")


def check_own_identity(config: NexusConfig, identity: IdentitySource) -> None:
    material = identity.current()
    if material.spiffe_id != config.nexus_spiffe_id:
        raise SpikeError(
            f"this SVID is {material.spiffe_id}, but Nexus must run as {config.nexus_spiffe_id}"
        )
    if config.tls_name not in material.dns_names:
        raise SpikeError(
            f"Nexus's SVID lacks the DNS SAN {config.tls_name!r} that clients pin "
            f"(has {list(material.dns_names)}); add it to the Nexus registration entry"
        )


def open_identity(config: NexusConfig) -> IdentitySource:
    if config.svid_cert and config.svid_key and config.trust_bundle:
        return IdentitySource(pem_files=(config.svid_cert, config.svid_key, config.trust_bundle))
    return IdentitySource()


def default_node_name(config: NexusConfig) -> str:
    """Stable across restarts of the same node; distinct for nodes sharing a store."""
    import socket

    return f"{socket.gethostname()}:{config.data_dir.resolve()}"


def kdf_params(config: NexusConfig) -> KdfParams:
    if config.insecure_test_kdf:
        log.warning("INSECURE test-only Argon2id parameters in use: never in production")
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
        return open_store("sqlite", path=config.sqlite_path)
    except StoreError as exc:
        raise SpikeError(f"cannot open the {config.store} store: {exc}") from None


def serve(config: NexusConfig) -> int:
    from nexus.api.server import NexusServer

    hardening = harden_process()
    if not hardening.fully_hardened:
        log.warning("process hardening incomplete",
                    core_dumps_disabled=hardening.core_dumps_disabled,
                    dumpable_off=hardening.dumpable_off, mlock_available=hardening.mlock_available)
    open_files = raise_open_file_limit()
    limits = connection_limits(open_files, max_connections=config.max_connections,
                               handshake_timeout=config.handshake_timeout_seconds,
                               max_concurrent_streams=config.max_concurrent_streams)
    if config.max_connections > limits.max_connections:
        log.warning("max_connections lowered to what the open-file limit allows",
                    requested=config.max_connections, max_connections=limits.max_connections,
                    open_files=open_files)
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = open_identity(config)
    check_own_identity(config, identity)
    audit = AuditLog(config.audit_target)
    store = open_configured_store(config)
    keys = KeyManager(store, config.backup_path, kdf_params(config),
                      allow_insecure_kdf=config.insecure_test_kdf,
                      backoff_base=config.recover_backoff_seconds,
                      authenticate_legacy_records=config.authenticate_legacy_records)
    if config.authenticate_legacy_records:
        log.warning("--authenticate-legacy-records is set: generation records with no tag "
                    "are accepted at the next recover; remove the flag after the upgrade")
    node = Node(store, config.store, keys, audit, hardening, str(config.backup_path),
                backup_verify_interval=config.backup_verify_interval_seconds,
                superuser_id=f"spiffe://{config.trust_domain}/spike/pilot/role/superuser",
                max_versions=config.max_secret_versions,
                max_value_bytes=config.max_value_bytes,
                data_dir=str(config.data_dir) if config.store == "sqlite" else None,
                scheduler_check_every=config.scheduler_check_seconds,
                node_name=config.node_name or default_node_name(config),
                shared_store=config.store == "postgres")
    metrics = None
    if config.metrics_listen:
        from nexus.api.authz import rpc_rules
        from nexus.metrics import NexusMetrics

        metrics = NexusMetrics(node, rpc_rules(config.trust_domain),
                               backup_verify_interval=config.backup_verify_interval_seconds)
    server = NexusServer(config, node, identity, audit,
                         interceptors=[metrics.interceptor] if metrics else [],
                         denied_hooks=[metrics.on_denied] if metrics else [],
                         limits=limits)
    node.on_state_change(server.update_health)
    node.start()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # No logging here: the handler may interrupt the main thread inside the
        # logger's own lock, and logging again would deadlock.
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    endpoint = metrics.serve(config.metrics_listen) if metrics else None
    server.start()
    log.info("nexus listening", address=server.address, spiffe_id=config.nexus_spiffe_id,
             state=node.state, store=config.store, open_files=limits.open_files,
             max_connections=limits.max_connections,
             handshake_timeout_ms=limits.handshake_timeout_ms,
             max_concurrent_streams=limits.max_concurrent_streams)
    status = 0
    try:
        try:
            audit.record("nexus.start", caller="(nexus)", outcome="ok", state=node.state,
                         durable=True)
        except OSError as exc:  # fail closed: no audit, no service
            raise SpikeError(f"cannot write the audit trail: {exc}") from None
        stop.wait()
        log.info("signal received, stopping",
                 signal=signal.Signals(received[0]).name if received else "")
    finally:
        node.rotation.shutdown()  # checkpoint; ends watch streams
        server.stop(grace=10.0)
        if endpoint is not None:
            endpoint.close()
        node.close()
        try:
            audit.record("nexus.stop", caller="(nexus)", outcome="ok", durable=True)
            audit.close()
        except (OSError, SpikeError) as exc:
            log.error("cannot write the audit trail at stop", error=str(exc))
            status = 1
        identity.close()
        log.info("nexus stopped")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except SpikeError as exc:
        print(f"spike-nexus: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        return serve(config)
    except SpikeError as exc:
        log.error("cannot start", error=str(exc))
        print(f"spike-nexus: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
