"""Builds the gRPC server: mTLS from the SPIFFE identity, authorization, services."""

from __future__ import annotations

import resource
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nexus.api.authz import AuthorizationInterceptor, Gate, rpc_rules
from nexus.api.health import BoundedHealthServicer
from nexus.api.operator import OperatorServicer
from nexus.api.policies import PoliciesServicer
from nexus.api.secrets import SecretsServicer
from nexus.audit import AuditLog
from nexus.backup.file import MAX_BACKUP_SIZE
from nexus.config import NexusConfig
from nexus.core.node import Node
from nexus.limits import ConnectionLimits, connection_limits
from spike.identity import IdentitySource
from spike.tls import MAX_MESSAGE_BYTES, server_credentials
from spike.v1 import (
    operator_pb2,
    operator_pb2_grpc,
    policies_pb2,
    policies_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)

SERVICE_NAMES = (
    operator_pb2.DESCRIPTOR.services_by_name["Operator"].full_name,
    secrets_pb2.DESCRIPTOR.services_by_name["Secrets"].full_name,
    policies_pb2.DESCRIPTOR.services_by_name["Policies"].full_name,
)


def _server_options(config: NexusConfig, limits: ConnectionLimits) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms",
         int(config.max_connection_age_grace_seconds * 1000)),
        # A request carries at most one secret (bounded by max_value_bytes) or one
        # backup (bounded at 1 MiB), plus framing.
        ("grpc.max_receive_message_length",
         max(config.max_value_bytes, MAX_BACKUP_SIZE) + 64 * 1024),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        # Unauthenticated connections hold a descriptor each (nexus/limits.py).
        ("grpc.server_handshake_timeout_ms", limits.handshake_timeout_ms),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
    ]


def _authorization(config: NexusConfig, node: Node, audit: AuditLog,
                   denied_hooks: Sequence[Callable[[str, str, str], None]]
                   ) -> AuthorizationInterceptor:
    def on_denied(method: str, caller: str, reason: str) -> None:
        audit.record("rpc.denied", caller=caller or "(none)", target=method,
                     outcome="denied", reason=reason)
        for hook in denied_hooks:
            hook(method, caller, reason)

    return AuthorizationInterceptor(
        rpc_rules(config.trust_domain),
        Gate(node.is_unsealed, node.sealed_message),
        on_denied,
        config.trust_domain,
    )


def _add_services(server: grpc.Server, node: Node, audit: AuditLog,
                  health_servicer: BoundedHealthServicer) -> None:
    operator_pb2_grpc.add_OperatorServicer_to_server(OperatorServicer(node), server)
    secrets_pb2_grpc.add_SecretsServicer_to_server(SecretsServicer(node.secrets, audit), server)
    policies_pb2_grpc.add_PoliciesServicer_to_server(
        PoliciesServicer(node.policies, audit), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )


class NexusServer:
    """The running gRPC server plus its health servicer."""

    def __init__(
        self, config: NexusConfig, node: Node, identity: IdentitySource, audit: AuditLog,
        *, interceptors: Sequence[Any] = (),
        denied_hooks: Sequence[Callable[[str, str, str], None]] = (),
        limits: ConnectionLimits | None = None,
    ) -> None:
        """``interceptors`` run before authorization (e.g. metrics); ``denied_hooks`` are
        called with (method, caller, reason) after a denial is audited; ``limits`` default
        to those derived from the current open-file limit."""
        self.node = node
        if limits is None:
            limits = connection_limits(
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                max_connections=config.max_connections,
                handshake_timeout=config.handshake_timeout_seconds,
                max_concurrent_streams=config.max_concurrent_streams)
        self.limits = limits
        self.health = BoundedHealthServicer(SERVICE_NAMES)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
            interceptors=[*interceptors, _authorization(config, node, audit, denied_hooks)],
            options=_server_options(config, limits),
        )
        _add_services(self.server, node, audit, self.health)
        try:
            self.port = self.server.add_secure_port(config.listen, server_credentials(identity))
        except RuntimeError:  # grpc's "Failed to bind": the port is busy or not ours
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {config.listen}: the address is in use or not "
                          "available on this host")
        host = config.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self.update_health()

    def update_health(self) -> None:
        serving = (
            health_pb2.HealthCheckResponse.SERVING
            if self.node.is_unsealed()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, serving)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float) -> None:
        self.server.stop(grace).wait()
