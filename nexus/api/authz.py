"""Authorization as data: which SPIFFE identities may call which RPC.

``rpc_rules(trust_domain)`` is the table; the interceptor applies it before
any servicer runs, then applies the sealed gate. The caller's ID is read from the
client certificate that the TLS handshake verified (the PEM in the auth context),
parsed with ``cryptography`` and checked by the SPIFFE ID and X509-SVID rules
(:mod:`spike.svid`); gRPC core's own ``peer_spiffe_id`` is never used, since it is
cut at a NUL byte. Secrets RPCs admit any identity of our trust domain here; the
policies in core then decide per path.
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from cryptography import x509

from nexus.api.errors import abort
from nexus.api.handlers import WrappingInterceptor, wrap_handler
from spike.errors import ErrorKind
from spike.roles import recover_id, superuser_id
from spike.svid import SvidRuleError, check_intermediates, leaf_spiffe_id

if TYPE_CHECKING:
    from nexus.api.handlers import Handler

_log = structlog.get_logger("nexus.authz")

Predicate = Callable[[str], bool]


@dataclass(frozen=True)
class Rule:
    description: str
    allows: Predicate


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
    for name in ("Put", "Get", "List", "Delete", "Undelete", "Destroy", "Metadata", "Import"):
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
    """The caller verified by the interceptor for this very call, else from the certificate."""
    seen = _verified.get()
    if seen is not None and seen[0] is context:
        return seen[1]
    peer = verify_peer(context)
    return peer.spiffe_id if isinstance(peer, VerifiedPeer) else ""


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """What a verified client chain says: the leaf's ID and the trust domains above it."""

    spiffe_id: str
    trust_domain: str
    chain_trust_domains: frozenset[str]


# (leaf PEM, presented chain PEM) -> the verdict. Parsing a certificate costs tens of
# microseconds; a caller keeps its SVID for many calls, so the hot path is one dict
# lookup. Keyed by the bytes themselves (no digest collisions to reason about);
# bounded, least recently used out.
VERDICT_CACHE_ENTRIES = 4096
_verdicts: OrderedDict[tuple[bytes, bytes], VerifiedPeer | str] = OrderedDict()
_verdicts_lock = threading.Lock()


def _one(auth: Mapping[str, Any], key: str) -> bytes:
    values: list[Any] = list(auth.get(key) or ())
    return values[0] if len(values) == 1 and isinstance(values[0], bytes) else b""


def verify_peer(context: grpc.ServicerContext) -> VerifiedPeer | str:
    """The caller's identity from its verified certificate, or the reason it has none."""
    auth: Mapping[str, Any] = context.auth_context()
    leaf_pem = _one(auth, "x509_pem_cert")
    chain_pem = _one(auth, "x509_pem_cert_chain")
    key = (leaf_pem, chain_pem)
    with _verdicts_lock:
        verdict = _verdicts.get(key)
        if verdict is not None:
            _verdicts.move_to_end(key)
            return verdict
    verdict = judge_chain(leaf_pem, chain_pem)
    with _verdicts_lock:
        _verdicts[key] = verdict
        while len(_verdicts) > VERDICT_CACHE_ENTRIES:
            _verdicts.popitem(last=False)
    return verdict


def judge_chain(leaf_pem: bytes, chain_pem: bytes) -> VerifiedPeer | str:
    """Apply the SVID rules to a client chain the handshake verified (PEM, leaf first)."""
    if not leaf_pem:
        return "no client certificate"
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        presented = x509.load_pem_x509_certificates(chain_pem) if chain_pem else []
    except ValueError:
        return "the client certificate cannot be parsed"
    # gRPC core lists the certificates sent after the leaf; skip the leaf if it is there.
    intermediates = [c for c in presented if c != leaf]
    try:
        spiffe_id = leaf_spiffe_id(leaf)
        domains = check_intermediates(intermediates)
    except SvidRuleError as exc:
        return str(exc)
    return VerifiedPeer(str(spiffe_id), spiffe_id.trust_domain, domains)


class Gate:
    """Answers whether an RPC may run in the current lifecycle state."""

    def __init__(
        self, is_unsealed: Callable[[], bool], sealed_message: Callable[[], tuple[str, str]]
    ) -> None:
        self._is_unsealed = is_unsealed
        self._sealed_message = sealed_message

    def check(self, method: str) -> tuple[ErrorKind, str] | None:
        """None when allowed; else (kind, message) for FAILED_PRECONDITION."""
        if method in SERVED_WHILE_SEALED or self._is_unsealed():
            return None
        kind, message = self._sealed_message()
        return ErrorKind(kind), message


class AuthorizationInterceptor(WrappingInterceptor):
    def __init__(
        self,
        rules: Mapping[str, Rule],
        gate: Gate,
        on_denied: Callable[[str, str, str], None],
        trust_domain: str,
    ) -> None:
        super().__init__()
        self._rules = rules
        self._trust_domain = trust_domain
        self._gate = gate
        self._on_denied = on_denied

    def _wrap(self, method: str, handler: Handler) -> Handler:
        rule = self._rules.get(method)
        gate = self._gate
        on_denied = self._on_denied
        trust_domain = self._trust_domain

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext, *more: Any) -> Any:
                peer = verify_peer(context)
                if not isinstance(peer, VerifiedPeer):
                    on_denied(method, "", peer)
                    abort(context, grpc.StatusCode.UNAUTHENTICATED, ErrorKind.UNAUTHENTICATED,
                          f"client certificate is not a valid X509-SVID: {peer}")
                caller = peer.spiffe_id
                if peer.chain_trust_domains - {trust_domain}:
                    # Not a verified identity: the audit names no caller.
                    on_denied(method, "", "the chain names another trust domain")
                    abort(context, grpc.StatusCode.UNAUTHENTICATED, ErrorKind.UNAUTHENTICATED,
                          "client certificate chain names another trust domain")
                if rule is None or not rule.allows(caller):
                    on_denied(method, caller, "not allowed by the RPC table")
                    abort(context, grpc.StatusCode.PERMISSION_DENIED, ErrorKind.PERMISSION_DENIED,
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

        return wrap_handler(wrap, handler)
