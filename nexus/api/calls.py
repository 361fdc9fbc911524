"""One wrapper per RPC: audit the outcome, then map domain errors to statuses."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal

import grpc

from nexus.api.authz import caller_of
from nexus.api.errors import abort_for
from nexus.audit import AuditLog
from nexus.core.errors import NexusError


class rpc_call:
    """``with rpc_call(context, audit, action, target) as caller:`` around a servicer body.

    Yields the caller's SPIFFE ID. Audits (when ``audit``) success or the error kind, then
    maps the error to its gRPC status (:func:`nexus.api.errors.abort_for`). A class rather
    than a generator context manager: it wraps every RPC, and this is the cheaper form.
    """

    __slots__ = ("_action", "_audit", "_caller", "_context", "_detail", "_durable", "_target")

    def __init__(
        self,
        context: grpc.ServicerContext,
        audit: AuditLog | None = None,
        action: str = "",
        target: str = "",
        durable: bool = False,
        **detail: Any,
    ) -> None:
        self._context = context
        self._audit = audit
        self._action = action
        self._target = target
        self._durable = durable
        self._detail = detail
        self._caller = ""

    def __enter__(self) -> str:
        self._caller = caller_of(self._context)
        return self._caller

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit, ...: not ours to map
        if self._audit is not None:
            if exc is None:
                outcome = "ok"
            elif isinstance(exc, NexusError):
                outcome = exc.kind.value  # a plain str: the audit line's fast path
            else:
                outcome = "internal_error"
            try:
                self._audit.record(self._action, caller=self._caller, target=self._target,
                                   outcome=outcome, durable=self._durable, **self._detail)
            except Exception as audit_failure:
                # No audit line, no answer (fail closed).
                abort_for(self._context, audit_failure)
        if exc is not None:
            abort_for(self._context, exc)
        return False
