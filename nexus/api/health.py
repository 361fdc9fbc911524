"""gRPC health checking for a fixed set of services, with no state per caller-chosen name.

grpcio-health-checking's servicer keeps an entry per distinct service name that was ever
watched, forever (an empty set once the stream ends): any identity of the trust domain could
grow Nexus by a megabyte per cancelled Watch. Here only the services Nexus serves can be
checked or watched; any other name is answered at once (Check: NOT_FOUND, Watch: one
SERVICE_UNKNOWN, then the stream ends) and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

# The longest service name Nexus knows is far shorter; anything longer is unknown.
MAX_SERVICE_NAME_BYTES = 256


class BoundedHealthServicer(health.HealthServicer):
    """``HealthServicer`` that keeps state only for ``services`` (plus "")."""

    def __init__(self, services: Iterable[str]) -> None:
        super().__init__(experimental_non_blocking=True)
        self._known = frozenset(("", *services))
        if any(len(name) > MAX_SERVICE_NAME_BYTES for name in self._known):
            raise ValueError("a known service name is longer than the bound")

    @property
    def known_services(self) -> frozenset[str]:
        return self._known

    def set(self, service: str, status: Any) -> None:
        if service not in self._known:
            raise ValueError("not a service Nexus serves")
        super().set(service, status)

    def Check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        if request.service not in self._known:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("unknown service")
            return health_pb2.HealthCheckResponse()
        return super().Check(request, context)

    def Watch(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext,
              send_response_callback: Callable[[Any], None] | None = None) -> Any:
        if request.service in self._known:
            return super().Watch(request, context, send_response_callback)
        unknown = health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        if send_response_callback is None:  # a server without non-blocking streams
            return iter((unknown,))
        send_response_callback(unknown)
        send_response_callback(None)  # ends the stream: nothing is kept for this name
        return None
