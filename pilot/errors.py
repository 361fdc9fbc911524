"""Pilot's errors, each with its exit code (README, "Exit codes") and a hint for the operator."""

from __future__ import annotations


class PilotError(Exception):
    exit_code = 1
    default_message = "the command failed"
    """Shown when the message is empty (e.g. a status with no detail)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message or self.default_message)
        self.hint = hint


class UsageError(PilotError):
    exit_code = 2
    default_message = "invalid usage or input"


class Unreachable(PilotError):
    """Nexus unreachable or the TLS handshake failed."""

    exit_code = 3
    default_message = "Nexus is unreachable"


class IdentityUnavailable(PilotError):
    """No SVID: the agent socket is missing or not answering (cannot reach Nexus without one)."""

    exit_code = 3
    default_message = "no SVID is available"


class PermissionDenied(PilotError):
    exit_code = 4
    default_message = "permission denied"


class NotReady(PilotError):
    """Nexus is sealed or uninitialized."""

    exit_code = 5
    default_message = "Nexus is sealed or uninitialized"


class NotFound(PilotError):
    exit_code = 6
    default_message = "not found"


class Conflict(PilotError):
    exit_code = 7
    default_message = "conflict: the state changed meanwhile"


class PasswordOrBackup(PilotError):
    """Wrong password or invalid backup."""

    exit_code = 8
    default_message = "wrong password or invalid backup"


class TooManyAttempts(PilotError):
    """The wrong-password backoff is in force: wait and try again."""

    exit_code = 9
    default_message = "too many failed attempts: retry later"


class AlreadyDone(PilotError):
    """Nothing to do: Nexus is already initialized (`init`) or already unsealed (`recover`)."""

    exit_code = 10
    default_message = "nothing to do"


# What each gRPC status means to an operator, for the statuses Pilot has no more precise
# error for. No raw code name (RESOURCE_EXHAUSTED, ...) is ever shown.
_STATUS_WORDS = {
    "OK": "unexpected answer from Nexus",
    "CANCELLED": "the call was cancelled",
    "UNKNOWN": "Nexus failed with an unexpected error (see its log)",
    "INVALID_ARGUMENT": "invalid request",
    "DEADLINE_EXCEEDED": "Nexus did not answer in time",
    "NOT_FOUND": "not found",
    "ALREADY_EXISTS": "already exists",
    "PERMISSION_DENIED": "permission denied",
    "RESOURCE_EXHAUSTED": "a size or rate limit was reached",
    "FAILED_PRECONDITION": "Nexus is not in a state to do that",
    "ABORTED": "the operation was aborted",
    "OUT_OF_RANGE": "a value is out of range",
    "UNIMPLEMENTED": "this Nexus does not implement that call",
    "INTERNAL": "Nexus hit an internal error (see its log)",
    "UNAVAILABLE": "Nexus is unavailable",
    "DATA_LOSS": "stored data or the backup failed an integrity check",
    "UNAUTHENTICATED": "not authenticated",
}

BACKOFF_HINT = ("each wrong password doubles the delay (up to 300 s): wait the time shown, "
                "then try again")


def from_status(code_name: str, kind: str, detail: str) -> PilotError:
    """The error for a status Pilot's client has no more specific mapping for."""
    if kind == "backoff":
        return TooManyAttempts(detail or "too many failed attempts", BACKOFF_HINT)
    if kind == "old_password_backup":
        return PasswordOrBackup(detail or "the backup is sealed under an earlier password",
                                "use a newer copy, or pass --accept-old-password and then "
                                "run `spike password change`")
    if kind in ("already_initialized", "already_unsealed"):
        return AlreadyDone(detail or "nothing to do")
    words = _STATUS_WORDS.get(code_name, "Nexus refused the call")
    if not detail:
        return PilotError(words)
    if kind:  # Nexus's own message: it already says what went wrong
        return PilotError(detail)
    return PilotError(f"{words}: {detail}")
