"""Domain errors of Nexus. The API layer maps each class to one gRPC status.

NexusError
├── NotReady               the root key is not available (kind: "sealed" or "uninitialized")
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


class NexusError(Exception):
    kind = "error"


class NotReady(NexusError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class AlreadyInitialized(NexusError):
    kind = "already_initialized"


class AlreadyUnsealed(AlreadyInitialized):
    """recover on a Nexus that holds its root key already (nothing to do)."""

    kind = "already_unsealed"


class InvalidInput(NexusError):
    kind = "invalid_argument"


class PasswordRejected(InvalidInput):
    kind = "password_rejected"


class NotFound(NexusError):
    kind = "not_found"


class Conflict(NexusError):
    kind = "conflict"


class Forbidden(NexusError):
    kind = "permission_denied"


class WrongPassword(NexusError):
    kind = "wrong_password"


class BackupInvalid(NexusError):
    kind = "backup_invalid"


class OldPasswordBackup(BackupInvalid):
    """The backup is sealed under an earlier password; recover needs explicit consent."""

    kind = "old_password_backup"


class TooManyAttempts(NexusError):
    kind = "backoff"

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed attempts: retry in {retry_after:.1f} s")
        self.retry_after = retry_after


class Unavailable(NexusError):
    kind = "unavailable"


class IntegrityError(NexusError):
    """A stored record failed to decrypt (tampered, moved, or its key is gone)."""

    kind = "integrity"


class MetadataIntegrityError(IntegrityError):
    """A path's plaintext metadata contradicts its stored records (a damaged or edited
    database): the operation is refused and nothing is changed."""

    kind = "metadata_integrity"
