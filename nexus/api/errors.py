"""One place that turns domain errors into gRPC statuses.

The status code tells the class; the trailing metadata ``spike-error-kind``
tells Pilot precisely which error it was (for exit codes), so no client ever
branches on message text.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
import structlog

from nexus.core import errors
from spike.errors import ERROR_KIND_KEY, ErrorKind

# Most specific class first.
_STATUS: list[tuple[type[errors.NexusError], grpc.StatusCode]] = [
    (errors.NotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AlreadyInitialized, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PasswordRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (errors.WrongPassword, grpc.StatusCode.UNAUTHENTICATED),
    (errors.OldPasswordBackup, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.BackupInvalid, grpc.StatusCode.DATA_LOSS),
    (errors.TooManyAttempts, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
]

_log = structlog.get_logger("nexus.api")


def status_for(exc: errors.NexusError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, kind: ErrorKind,
          message: str) -> NoReturn:
    context.set_trailing_metadata(((ERROR_KIND_KEY, kind.value),))
    context.abort(code, message)


def abort_for(context: grpc.ServicerContext, exc: Exception) -> None:
    """End the call with the status for ``exc`` (always raises): a NexusError maps to its
    status and message; anything else is INTERNAL with no detail."""
    if isinstance(exc, errors.NexusError):
        abort(context, status_for(exc), exc.kind, str(exc))
    # The type and place only: exception text from lower layers is not trusted to
    # be free of request data.
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
    _log.error("internal error", error_type=type(exc).__name__, where=where)
    abort(context, grpc.StatusCode.INTERNAL, ErrorKind.INTERNAL, "internal error (see Nexus logs)")
