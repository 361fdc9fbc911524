"""spike-nexus: config -> hardening -> identity -> build (nexus/app.py) -> serve until a signal."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import structlog

from nexus.app import NexusApp, build
from nexus.config import NexusConfig, load_config
from nexus.crypto.hardening import HardeningReport, harden_process
from nexus.limits import ConnectionLimits, connection_limits, raise_open_file_limit
from nexus.logs import configure_logging
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


def harden() -> HardeningReport:
    hardening = harden_process()
    if not hardening.fully_hardened:
        log.warning("process hardening incomplete",
                    core_dumps_disabled=hardening.core_dumps_disabled,
                    dumpable_off=hardening.dumpable_off, mlock_available=hardening.mlock_available)
    return hardening


def serving_limits(config: NexusConfig) -> ConnectionLimits:
    open_files = raise_open_file_limit()
    limits = connection_limits(open_files, max_connections=config.max_connections,
                               handshake_timeout=config.handshake_timeout_seconds,
                               max_concurrent_streams=config.max_concurrent_streams)
    if config.max_connections > limits.max_connections:
        log.warning("max_connections lowered to what the open-file limit allows",
                    requested=config.max_connections, max_connections=limits.max_connections,
                    open_files=open_files)
    return limits


def warn_test_switches(config: NexusConfig) -> None:
    if config.insecure_test_kdf:
        log.warning("INSECURE test-only Argon2id parameters in use: never in production")
    if config.authenticate_legacy_records:
        log.warning("--authenticate-legacy-records is set: generation records with no tag "
                    "are accepted at the next recover; remove the flag after the upgrade")


class Signals:
    """SIGTERM and SIGINT, caught from construction on (before Nexus starts serving)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._received: list[int] = []
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # No logging here: the handler may interrupt the main thread inside the
        # logger's own lock, and logging again would deadlock.
        self._received.append(signum)
        self._stop.set()

    def wait(self) -> str:
        """Block until a signal arrives; its name."""
        self._stop.wait()
        return signal.Signals(self._received[0]).name if self._received else ""


def run(app: NexusApp, identity: IdentitySource, limits: ConnectionLimits) -> int:
    """Serve until a signal; the exit status (1 when the audit trail fails at stop)."""
    config, node, audit = app.config, app.node, app.audit
    signals = Signals()
    app.start()
    assert app.server is not None
    log.info("nexus listening", address=app.server.address, spiffe_id=config.nexus_spiffe_id,
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
        log.info("signal received, stopping", signal=signals.wait())
    finally:
        app.shutdown(grace=10.0)
        try:
            audit.record("nexus.stop", caller="(nexus)", outcome="ok", durable=True)
            audit.close()
        except (OSError, SpikeError) as exc:
            log.error("cannot write the audit trail at stop", error=str(exc))
            status = 1
        identity.close()
        log.info("nexus stopped")
    return status


def serve(config: NexusConfig) -> int:
    hardening = harden()
    limits = serving_limits(config)
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = open_identity(config)
    check_own_identity(config, identity)
    warn_test_switches(config)
    app = build(config, identity=identity, limits=limits, hardening=hardening)
    return run(app, identity, limits)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except SpikeError as exc:
        print(f"spike-nexus: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        return serve(config)
    except (SpikeError, OSError) as exc:  # e.g. a busy --listen port: a message, no traceback
        log.error("cannot start", error=str(exc))
        print(f"spike-nexus: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
