"""Errors shared by Nexus and Pilot.

``SpikeError`` is the root. Messages are built in the exception and never
contain a password, a key or a secret value.
"""

from __future__ import annotations

from enum import StrEnum

# Trailing-metadata key with which Nexus tells Pilot precisely which error it returned
# (the status code alone is ambiguous; no client branches on message text).
ERROR_KIND_KEY = "spike-error-kind"


class SpikeError(Exception):
    """Root of every error this project raises on purpose."""


class IdentityError(SpikeError):
    """No usable SPIFFE identity (agent socket missing, not answering, bad PEM files)."""


class ConfigError(SpikeError):
    """Invalid configuration (flag, environment variable or config file)."""


class ErrorKind(StrEnum):
    """What went wrong, as Nexus names it in the ``spike-error-kind`` trailing metadata.

    Nexus sets one on every refusal (``nexus/core/errors.py``, ``nexus/api``); Pilot maps each
    one to an exit code (``pilot/errors.py``, README "Exit codes"). The values are part of the
    interface (and the audit trail's ``outcome`` of a refused call).
    """

    ERROR = "error"  # no more precise kind
    UNINITIALIZED = "uninitialized"  # no root key yet: run `spike init`
    SEALED = "sealed"  # the root key is not in memory: run `spike recover`
    STALE = "stale"  # a record is under a generation this node does not hold
    STORE = "store"  # the store is not writable (e.g. a rotation's precheck)
    ALREADY_INITIALIZED = "already_initialized"
    ALREADY_UNSEALED = "already_unsealed"
    INVALID_ARGUMENT = "invalid_argument"
    PASSWORD_REJECTED = "password_rejected"  # noqa: S105 - the policy refused a new password
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"  # no valid X509-SVID, or a chain from another domain
    WRONG_PASSWORD = "wrong_password"  # noqa: S105 - a kind, not a password
    BACKUP_INVALID = "backup_invalid"
    OLD_PASSWORD_BACKUP = "old_password_backup"  # noqa: S105 - a kind, not a password
    BACKOFF = "backoff"
    UNAVAILABLE = "unavailable"
    INTEGRITY = "integrity"
    METADATA_INTEGRITY = "metadata_integrity"
    INTERNAL = "internal"  # not a NexusError (a bug): Nexus's log has the details
