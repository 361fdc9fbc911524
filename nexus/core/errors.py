"""Domain errors of Nexus. The API layer maps each class to one gRPC status.

NexusError
├── NotReady               the root key or the store is not ready (kind says which)
├── AlreadyInitialized     init on an initialized Nexus
│   └── AlreadyUnsealed    recover on an unsealed Nexus
├── InvalidInput           bad path, value, pattern, parameter (INVALID_ARGUMENT)
├── PasswordRejected       the password policy refused a new password (INVALID_ARGUMENT)
├── NotFound               no such secret, version or policy
├── Conflict               check-and-set mismatch, rotation already running
├── Forbidden              no policy allows the caller this action
├── WrongPassword          the password does not open the backup
├── BackupInvalid          the backup is missing, corrupt, truncated, foreign or mismatched
│   └── OldPasswordBackup  sealed under an earlier password: recover needs explicit consent
├── TooManyAttempts        recovery backoff in force; retry later
├── Unavailable            the store cannot be reached or written
└── IntegrityError         a stored record failed to decrypt (DATA_LOSS)
    └── MetadataIntegrityError  a path's plaintext metadata contradicts its records

Messages are safe to show to the caller: never a value, a password or a key.
"""

from __future__ import annotations

from spike.errors import ErrorKind


class NexusError(Exception):
    kind: ErrorKind = ErrorKind.ERROR


class NotReady(NexusError):
    """The kind says why: UNINITIALIZED, SEALED, STALE (another node rotated) or STORE (not
    writable, so a rotation is refused)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)  # a stray string fails here, not in Pilot


class AlreadyInitialized(NexusError):
    kind = ErrorKind.ALREADY_INITIALIZED


class AlreadyUnsealed(AlreadyInitialized):
    """recover on a Nexus that holds its root key already (nothing to do)."""

    kind = ErrorKind.ALREADY_UNSEALED


class InvalidInput(NexusError):
    kind = ErrorKind.INVALID_ARGUMENT


class PasswordRejected(InvalidInput):
    kind = ErrorKind.PASSWORD_REJECTED


class NotFound(NexusError):
    kind = ErrorKind.NOT_FOUND


class Conflict(NexusError):
    kind = ErrorKind.CONFLICT


class Forbidden(NexusError):
    kind = ErrorKind.PERMISSION_DENIED


class WrongPassword(NexusError):
    kind = ErrorKind.WRONG_PASSWORD


class BackupInvalid(NexusError):
    kind = ErrorKind.BACKUP_INVALID


class OldPasswordBackup(BackupInvalid):
    """The backup is sealed under an earlier password; recover needs explicit consent."""

    kind = ErrorKind.OLD_PASSWORD_BACKUP


class TooManyAttempts(NexusError):
    kind = ErrorKind.BACKOFF

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed attempts: retry in {retry_after:.1f} s")
        self.retry_after = retry_after


class Unavailable(NexusError):
    kind = ErrorKind.UNAVAILABLE


class IntegrityError(NexusError):
    """A stored record failed to decrypt (tampered, moved, or its key is gone)."""

    kind = ErrorKind.INTEGRITY


class MetadataIntegrityError(IntegrityError):
    """A path's plaintext metadata contradicts its stored records (a damaged or edited
    database): the operation is refused and nothing is changed."""

    kind = ErrorKind.METADATA_INTEGRITY
