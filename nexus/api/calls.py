"""One wrapper per RPC: audit the outcome, then map domain errors to statuses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from nexus.api.authz import caller_of
from nexus.api.errors import mapped_errors
from nexus.audit import AuditLog
from nexus.core.errors import NexusError


@contextmanager
def rpc_call(
    context: grpc.ServicerContext,
    audit: AuditLog | None = None,
    action: str = "",
    target: str = "",
    durable: bool = False,
    **detail: Any,
) -> Iterator[str]:
    """Yields the caller's SPIFFE ID. Audits (when ``audit``) success or the error kind."""
    caller = caller_of(context)
    with mapped_errors(context):
        try:
            yield caller
        except NexusError as exc:
            if audit is not None:
                audit.record(action, caller=caller, target=target, outcome=exc.kind,
                             durable=durable, **detail)
            raise
        except Exception:
            if audit is not None:
                audit.record(action, caller=caller, target=target, outcome="internal_error",
                             durable=durable, **detail)
            raise
        if audit is not None:
            audit.record(action, caller=caller, target=target, outcome="ok", durable=durable,
                         **detail)
