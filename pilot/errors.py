"""Pilot's errors, each with its exit code (CONTRACT.md) and a hint for the operator."""

from __future__ import annotations


class PilotError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(PilotError):
    exit_code = 2


class Unreachable(PilotError):
    """Nexus unreachable or the TLS handshake failed."""

    exit_code = 3


class IdentityUnavailable(PilotError):
    """No SVID: the agent socket is missing or not answering (cannot reach Nexus without one)."""

    exit_code = 3


class PermissionDenied(PilotError):
    exit_code = 4


class NotReady(PilotError):
    """Nexus is sealed or uninitialized."""

    exit_code = 5


class NotFound(PilotError):
    exit_code = 6


class Conflict(PilotError):
    exit_code = 7


class PasswordOrBackup(PilotError):
    """Wrong password or invalid backup."""

    exit_code = 8
