"""Authorization as data: which SPIFFE identities may call which RPC.

``rpc_rules(trust_domain)`` is the table; the interceptor applies it before
any servicer runs, then applies the sealed gate. The caller's ID comes only
from gRPC core's ``peer_spiffe_id`` (set when the verified client leaf has
exactly one spiffe:// URI SAN). Secrets RPCs admit any identity of our trust
domain here; the policies in core then decide per path.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from nexus.api.errors import abort
from nexus.api.handlers import wrap_handler

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor

_log = structlog.get_logger("nexus.authz")

Predicate = Callable[[str], bool]


@dataclass(frozen=True)
class Rule:
    description: str
    allows: Predicate


def superuser_id(td: str) -> str:
    return f"spiffe://{td}/spike/pilot/role/superuser"


def recover_id(td: str) -> str:
    return f"spiffe://{td}/spike/pilot/role/recover"


def exactly(*ids: str) -> Predicate:
    allowed = frozenset(ids)
    return lambda caller: caller in allowed


def in_trust_domain(td: str) -> Predicate:
    prefix = f"spiffe://{td}/"
    return lambda caller: caller.startswith(prefix) and len(caller) > len(prefix)


def rpc_rules(td: str) -> dict[str, Rule]:
    """The full table: every RPC Nexus serves must have an entry (a test checks)."""
    su = Rule("superuser", exactly(superuser_id(td)))
    admin = Rule("superuser or recover", exactly(superuser_id(td), recover_id(td)))
    member = Rule(f"any identity in {td} (policies decide)", in_trust_domain(td))
    op = "/spike.v1.Operator/"
    table: dict[str, Rule] = {
        op + "Status": admin,
        op + "Init": su,
        op + "Recover": admin,
        op + "BackupStatus": admin,
        op + "BackupVerify": admin,
        op + "BackupExport": su,
        op + "ChangePassword": su,
        op + "StartRotation": su,
        op + "WatchRotation": su,
        op + "RotationStatus": su,
        op + "AbortRotation": su,
        op + "ResumeRotation": su,
        op + "GetRotationSchedule": su,
        op + "SetRotationSchedule": su,
        "/grpc.health.v1.Health/Check": member,
        "/grpc.health.v1.Health/Watch": member,
        "/grpc.health.v1.Health/List": member,
        # Reflection streams hold a worker thread each: operators only.
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": admin,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": admin,
    }
    for name in ("Put", "Get", "List", "Delete", "Undelete", "Destroy", "Metadata"):
        table[f"/spike.v1.Secrets/{name}"] = member
    for name in ("Put", "Get", "List", "Delete"):
        table[f"/spike.v1.Policies/{name}"] = su
    return table


# Served while the root key is not in memory (the sealed gate).
SERVED_WHILE_SEALED = frozenset(
    {
        "/spike.v1.Operator/Status",
        "/spike.v1.Operator/Init",
        "/spike.v1.Operator/Recover",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


# The caller the interceptor verified for the call running on this thread/context, so
# the servicer does not ask gRPC core for the auth context a second time. Set only for
# the duration of the handler call; streaming bodies that run later fall back.
_verified: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar(
    "spike_verified_caller", default=None)


def caller_of(context: grpc.ServicerContext) -> str:
    """The caller verified by the interceptor for this very call, else from gRPC core."""
    seen = _verified.get()
    if seen is not None and seen[0] is context:
        return seen[1]
    return peer_spiffe_id(context)


def peer_spiffe_id(context: grpc.ServicerContext) -> str:
    """The verified caller ID, or "" when gRPC core did not set exactly one."""
    values: Any = context.auth_context().get("peer_spiffe_id") or []
    if len(values) != 1:
        return ""
    raw = values[0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Gate:
    """Answers whether an RPC may run in the current lifecycle state."""

    def __init__(
        self, is_unsealed: Callable[[], bool], sealed_message: Callable[[], tuple[str, str]]
    ) -> None:
        self._is_unsealed = is_unsealed
        self._sealed_message = sealed_message

    def check(self, method: str) -> tuple[str, str] | None:
        """None when allowed; else (kind, message) for FAILED_PRECONDITION."""
        if method in SERVED_WHILE_SEALED or self._is_unsealed():
            return None
        return self._sealed_message()


class AuthorizationInterceptor(_Interceptor):
    def __init__(
        self,
        rules: Mapping[str, Rule],
        gate: Gate,
        on_denied: Callable[[str, str, str], None],
    ) -> None:
        self._rules = rules
        self._gate = gate
        self._on_denied = on_denied
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        method: str = details.method
        # The registered handler for a method never changes: wrap it once, not per call.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        if handler is not None:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        rule = self._rules.get(method)
        gate = self._gate
        on_denied = self._on_denied

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext, *more: Any) -> Any:
                caller = peer_spiffe_id(context)
                if not caller:
                    on_denied(method, "", "no single SPIFFE ID in the client certificate")
                    abort(context, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                          "client certificate carries no single spiffe:// URI SAN")
                if rule is None or not rule.allows(caller):
                    on_denied(method, caller, "not allowed by the RPC table")
                    abort(context, grpc.StatusCode.PERMISSION_DENIED, "permission_denied",
                          f"{caller} may not call {method}")
                blocked = gate.check(method)
                if blocked is not None:
                    kind, message = blocked
                    abort(context, grpc.StatusCode.FAILED_PRECONDITION, kind, message)
                token = _verified.set((context, caller))
                try:
                    return behavior(request, context, *more)
                finally:
                    _verified.reset(token)

            return guarded

        if handler is None:
            return None
        return wrap_handler(wrap, handler)
