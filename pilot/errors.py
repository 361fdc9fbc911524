"""Pilot's errors, each with its exit code (README, "Exit codes") and a hint for the operator.

Every exit code Pilot gives lives here: the error classes, the two codes a command returns
rather than raises (``EXIT_ROTATION_FAILED``, ``AuditTailTorn``), and ``KIND_ANSWERS``, the
error for each kind Nexus names (:class:`spike.errors.ErrorKind`; a test checks that every
kind has one).

    0 ok                          7 conflict
    1 other error                 8 wrong password or invalid backup
    2 usage or invalid input      9 too many failed password attempts
    3 unreachable, TLS, no SVID  10 nothing to do
    4 permission denied          11 the rotation failed
    5 not ready                  12 the audit trail has a torn last line
    6 not found
"""

from __future__ import annotations

from dataclasses import dataclass

from spike.errors import ErrorKind


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
    """Nexus is sealed or uninitialized, this node is stale, or its store is not writable."""

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


class AuditChainBroken(PilotError):
    """An audit line was edited, deleted, inserted or reordered (`audit verify`)."""

    exit_code = 1


class AuditTailTorn(PilotError):
    """Every complete line is chained; the last one lacks its line break (a write cut short
    by a full disk or a crash). Nexus moves those bytes aside to FILE.torn at its next start."""

    exit_code = 12


# `spike rotate` / `rotation watch` / `rotation resume` when the rotation ended FAILED
# (both keys kept, resumable); 1 stays "aborted" or another error.
EXIT_ROTATION_FAILED = 11


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
PERMISSION_HINT = "use an identity allowed for this command (superuser Pilot, or a policy)"


@dataclass(frozen=True)
class KindAnswer:
    """How Pilot answers one kind: the error (hence the exit code), the message when Nexus
    sent none (else the error's default, or for a plain PilotError the status's words), a
    hint, and a prefix before Nexus's message."""

    error: type[PilotError]
    fallback: str = ""
    hint: str = ""
    prefix: str = ""


_DENIED = KindAnswer(PermissionDenied, hint=PERMISSION_HINT, prefix="permission denied: ")
_OTHER = KindAnswer(PilotError)  # exit 1: Nexus's message says what went wrong

KIND_ANSWERS: dict[ErrorKind, KindAnswer] = {
    ErrorKind.ERROR: _OTHER,
    ErrorKind.INTERNAL: _OTHER,
    ErrorKind.UNAVAILABLE: _OTHER,  # the store refused an operation: retry once it is fixed
    ErrorKind.INTEGRITY: _OTHER,  # a record failed its integrity check
    ErrorKind.METADATA_INTEGRITY: _OTHER,
    # Nexus's message already says what to run.
    ErrorKind.UNINITIALIZED: KindAnswer(NotReady),
    ErrorKind.SEALED: KindAnswer(NotReady),
    ErrorKind.STALE: KindAnswer(NotReady),
    ErrorKind.STORE: KindAnswer(NotReady),  # not writable: a rotation is refused
    ErrorKind.ALREADY_INITIALIZED: KindAnswer(AlreadyDone, "nothing to do"),
    ErrorKind.ALREADY_UNSEALED: KindAnswer(AlreadyDone, "nothing to do"),
    ErrorKind.INVALID_ARGUMENT: KindAnswer(UsageError),
    ErrorKind.PASSWORD_REJECTED: KindAnswer(UsageError),
    ErrorKind.NOT_FOUND: KindAnswer(NotFound),
    ErrorKind.CONFLICT: KindAnswer(Conflict),
    ErrorKind.PERMISSION_DENIED: _DENIED,
    ErrorKind.UNAUTHENTICATED: _DENIED,
    ErrorKind.WRONG_PASSWORD: KindAnswer(PasswordOrBackup),
    ErrorKind.BACKUP_INVALID: KindAnswer(PasswordOrBackup),
    ErrorKind.OLD_PASSWORD_BACKUP: KindAnswer(
        PasswordOrBackup, "the backup is sealed under an earlier password",
        "use a newer copy, or pass --accept-old-password and then run `spike password change`"),
    ErrorKind.BACKOFF: KindAnswer(TooManyAttempts, "too many failed attempts", BACKOFF_HINT),
}


def status_words(code_name: str) -> str:
    return _STATUS_WORDS.get(code_name, "Nexus refused the call")


def from_kind(kind: ErrorKind, code_name: str, detail: str) -> PilotError:
    """The error for a refusal Nexus named the kind of."""
    answer = KIND_ANSWERS[kind]
    message = answer.prefix + detail if answer.prefix else detail or answer.fallback
    if not message and answer.error is PilotError:
        message = status_words(code_name)
    return answer.error(message, answer.hint)


def from_status(code_name: str, detail: str, nexus_message: bool = False) -> PilotError:
    """The error for a status Pilot has no kind or more specific mapping for; with
    ``nexus_message`` (a kind this Pilot does not know) the detail is shown as it is."""
    words = status_words(code_name)
    if not detail:
        return PilotError(words)
    if nexus_message:
        return PilotError(detail)
    return PilotError(f"{words}: {detail}")
