"""The state sets of the root key lifecycle, one home for Nexus and Pilot.

Each value is the word that appears in JSON output, metric labels, the audit trail and the stored
rotation state, so these strings are part of the interface: never rename a member's value.
The gRPC enums (``spike.v1.operator_pb2``) carry the same names upper-cased behind a prefix
(``STATE_SEALED``, ``ROTATION_PHASE_REENCRYPT``); ``proto_name`` and ``from_proto_name`` convert.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

E = TypeVar("E", bound=StrEnum)


class LifecycleState(StrEnum):
    """Where the root key is: never made, made but not in memory, in memory."""

    UNINITIALIZED = "uninitialized"
    SEALED = "sealed"
    UNSEALED = "unsealed"


class BackupStatus(StrEnum):
    """The last check of the encrypted backup file."""

    UNKNOWN = "unknown"  # not checked yet (start-up, before the first check)
    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"  # unreadable, truncated, malformed, or a failed checksum
    MISMATCH = "mismatch"  # well formed, but its generations are not the ones in memory


class RotationPhase(StrEnum):
    """A rotation's phases, in order, then its three ends (docs/runbooks/rotation.md)."""

    IDLE = "idle"  # no rotation has run yet
    PRECHECK = "precheck"
    NEW_KEY = "new_key"
    REENCRYPT = "reencrypt"
    VALIDATE = "validate"
    FINALIZE = "finalize"
    ROLLBACK = "rollback"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_PHASES


_TERMINAL_PHASES = frozenset({RotationPhase.COMPLETED, RotationPhase.FAILED, RotationPhase.ABORTED})


class FailureKind(StrEnum):
    """Why a rotation stopped in the FAILED phase."""

    STORE = "store"  # the database or a file in the data directory refused an operation
    INTEGRITY = "integrity"  # records that do not decrypt under their own key
    VALIDATION = "validation"  # a record does not decrypt under the new key
    ROLLBACK = "rollback"  # a rollback left records under the new key
    INTERNAL = "internal"  # anything else (a bug): the log has the traceback


def proto_name(value: StrEnum, prefix: str) -> str:
    """``RotationPhase.NEW_KEY`` with prefix ``ROTATION_PHASE_`` -> ``ROTATION_PHASE_NEW_KEY``."""
    return prefix + value.value.upper()


def from_proto_name(enum: type[E], name: str, prefix: str) -> E:
    """The member behind a gRPC enum name; ValueError for UNSPECIFIED or an unknown name."""
    return enum(name.removeprefix(prefix).lower())


# The prefixes of the gRPC enums (spike.v1.operator_pb2.State, .RotationPhase).
STATE_PREFIX = "STATE_"
ROTATION_PHASE_PREFIX = "ROTATION_PHASE_"
