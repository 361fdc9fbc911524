"""The storage contract: the `Store` protocol, its value types and its errors.

The store only ever sees ciphertext blobs plus the plaintext columns needed to index them
(kind, path, version, generation, timestamps, flags). It does no cryptography: the caller
encrypts, usually through the ``seal`` callback of :meth:`Store.put_secret`, which lets the
caller bind the version chosen inside the store's transaction into the associated data.

Every operation is atomic. Backends are thread-safe and may be shared by several threads
(and, for PostgreSQL, by several Nexus processes sharing one database).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

KIND_SECRET = "secret"  # noqa: S105 - a record kind, not a credential
"""Record kind of one secret version: path = secret path, version = 1, 2, ..."""

KIND_POLICY = "policy"
"""Record kind of one policy: path = policy name, version = 0."""

POLICY_VERSION = 0
"""Policies are not versioned; their single row always has this version."""

Seal = Callable[[int], tuple[int, bytes]]
"""``seal(version) -> (generation, blob)``: encrypts a new secret version for the store."""


class PutRequest(NamedTuple):
    """The arguments of one :meth:`Store.put_secret`, for :meth:`Store.put_secrets`."""

    path: str
    cas: int | None
    max_versions: int
    now: float
    seal: Seal


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Root of every error the store raises on purpose."""


class CasMismatch(StoreError):
    """A check-and-set write found another current version than the caller expected."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"check-and-set failed: expected version {expected}, current is {actual}")
        self.expected = expected
        self.actual = actual


class NotFound(StoreError):
    """The requested secret, version, policy or row does not exist."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer release than this code; refusing to touch it."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than this release knows ({known}); "
            "upgrade SPIKE before opening this store"
        )
        self.found = found
        self.known = known


class InconsistentMetadata(StoreError):
    """A path's plaintext bookkeeping contradicts its records (a damaged or edited database).

    The operation is refused and nothing is changed: acting on such metadata could delete
    data (e.g. an ``oldest_version`` above the current version would prune every version).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"secret {path!r}: inconsistent metadata: {reason}")
        self.path = path
        self.reason = reason


class StoreUnavailable(StoreError):
    """The database cannot be reached, is locked for too long, read-only or out of space."""


class ConstraintViolation(StoreError):
    """A write broke a constraint of the schema (a duplicate key, a failed check): the
    database was edited or damaged behind the store's back. Nothing was written."""


# --------------------------------------------------------------------------- values


PutOutcome = int | CasMismatch | InconsistentMetadata
"""What :meth:`Store.put_secrets` reports for one request: its new version, or why it was
refused (nothing of that request was written)."""


class RecordKey(NamedTuple):
    """Identity of one record row; orders like the keyset pagination (kind, path, version)."""

    kind: str
    path: str
    version: int


class ScanRow(NamedTuple):
    """What a rotation scan returns for one record: its key, generation and ciphertext
    (scanned rows always have one), and nothing else (a million of these per pass)."""

    kind: str
    path: str
    version: int
    generation: int
    blob: bytes

    @property
    def key(self) -> RecordKey:
        """The row's primary key."""
        return RecordKey(self.kind, self.path, self.version)


class RecordRow(NamedTuple):
    """One stored record (a secret version or a policy) with its ciphertext.

    ``blob`` is ``None`` exactly when the row was destroyed. ``generation`` is the root key
    generation the blob is encrypted under.
    """

    kind: str
    path: str
    version: int
    generation: int
    blob: bytes | None
    created_at: float
    deleted_at: float | None
    destroyed: bool

    @property
    def key(self) -> RecordKey:
        """The row's primary key."""
        return RecordKey(self.kind, self.path, self.version)

    @property
    def deleted(self) -> bool:
        """True when the row is soft-deleted."""
        return self.deleted_at is not None


class SecretRow(NamedTuple):
    """One secret version as returned by :meth:`Store.get_secret`.

    The store returns soft-deleted and destroyed versions too (``deleted_at`` set, or
    ``destroyed`` with ``blob=None``); the caller decides how to present them.
    """

    path: str
    version: int
    generation: int
    blob: bytes | None
    created_at: float
    deleted_at: float | None
    destroyed: bool

    @property
    def key(self) -> RecordKey:
        """The row's primary key."""
        return RecordKey(KIND_SECRET, self.path, self.version)

    @property
    def deleted(self) -> bool:
        """True when the version is soft-deleted."""
        return self.deleted_at is not None


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """Plaintext bookkeeping of one retained secret version (no ciphertext)."""

    version: int
    created_at: float
    deleted_at: float | None
    destroyed: bool


@dataclass(frozen=True, slots=True)
class SecretMeta:
    """Metadata of one secret path.

    ``current_version`` is the newest version ever written; ``oldest_version`` the oldest one
    still retained (older ones were pruned and are really gone). ``updated_at`` is the time of
    the last :meth:`Store.put_secret`. ``versions`` lists every retained version, ascending.
    """

    path: str
    current_version: int
    oldest_version: int
    created_at: float
    updated_at: float
    versions: tuple[VersionInfo, ...]


class GenerationMismatch(NamedTuple):
    """A record whose ``generation`` column disagrees with its ciphertext header.

    The header (authenticated: it is part of the associated data) is the truth; the column
    is only an index of it. ``header`` is 0 when the blob has no well-formed envelope header
    (too short, unknown format, generation 0): such a record cannot be decrypted at all.
    """

    kind: str
    path: str
    version: int
    cell: int
    header: int

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.kind, self.path, self.version)


ENVELOPE_FORMAT = 1
ENVELOPE_MIN_BYTES = 33
"""The envelope header the store can read without any key (see nexus.crypto.envelope):
byte 0 the format (1), bytes 1..4 the generation (big-endian), at least 33 bytes in all."""


def header_generation(head: bytes | None, long_enough: bool) -> int:
    """The generation in the first 5 bytes of a blob, or 0 if they are no valid header."""
    if head is None or not long_enough or len(head) < 5 or head[0] != ENVELOPE_FORMAT:
        return 0
    return int.from_bytes(bytes(head[1:5]), "big")


MAX_SECRET_VERSION = 2**31 - 1
"""The largest version number (a signed 32-bit column on PostgreSQL)."""


def check_metadata(path: str, current: int, oldest: int, newest_stored: int | None) -> None:
    """Raise :class:`InconsistentMetadata` unless a path's metadata agrees with its records.

    ``current``/``oldest`` come from the metadata row (0/1 for a path not yet written);
    ``newest_stored`` is the highest version present in the records table (None: none).
    """
    if current < 0 or oldest < 1:
        raise InconsistentMetadata(path, f"current version {current}, oldest {oldest}")
    if current >= MAX_SECRET_VERSION:
        raise InconsistentMetadata(
            path, f"current version {current} is at or past the last possible version "
                  f"({MAX_SECRET_VERSION})")
    if current > 0 and oldest > current:
        raise InconsistentMetadata(
            path, f"the oldest retained version ({oldest}) is above the current one "
                  f"({current})")
    if newest_stored is not None and newest_stored > current:
        if current == 0:
            reason = f"versions up to {newest_stored} are stored but the path has no metadata"
        else:
            reason = (f"version {newest_stored} is stored but the metadata says the current "
                      f"version is {current}")
        raise InconsistentMetadata(path, reason)


class BlobUpdate(NamedTuple):
    """A conditional re-encryption of one row, for :meth:`Store.replace_blobs`.

    The row is changed only if its generation and blob still equal the expected ones.
    Flat (no nested key) because a rotation builds and binds one per record.
    """

    kind: str
    path: str
    version: int
    expected_generation: int
    expected_blob: bytes
    new_generation: int
    new_blob: bytes

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.kind, self.path, self.version)


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Store(Protocol):
    """What Nexus needs from a database. Implemented by the SQLite and PostgreSQL backends.

    No driver exception escapes a store: errors that mean "the database is not usable right
    now" surface as :class:`StoreUnavailable`, a broken constraint as
    :class:`ConstraintViolation`, any other as :class:`StoreError`. Exceptions raised by the
    caller's ``seal`` callback propagate unchanged (and the transaction is rolled back).
    """

    # -- secrets -----------------------------------------------------------------------

    def put_secret(self, path: str, *, cas: int | None, max_versions: int, now: float,
                   seal: Seal) -> int:
        """Write a new version of ``path`` in one transaction and return its number.

        ``cas=None`` writes unconditionally; otherwise the current version must equal ``cas``
        (``0`` = the path must not exist yet) or :class:`CasMismatch` is raised. The new
        version is ``current + 1``; ``seal(version)`` returns ``(generation, blob)``, called
        inside the transaction. Versions older than the newest ``max_versions`` (>= 1) are
        deleted for good. Returns only once the commit holding the new version is durable;
        concurrent puts may share that commit (SQLite's group commit), each still with its
        own outcome.
        """
        ...

    def put_secrets(self, requests: Sequence[PutRequest]) -> list[PutOutcome]:
        """Apply several puts in one durable commit; one outcome per request, in order.

        Each request is all-or-nothing on its own, exactly as :meth:`put_secret` (its own
        savepoint): a refused one (:class:`CasMismatch`, :class:`InconsistentMetadata`) is
        reported in its slot and leaves no trace, and the others still commit. Requests are
        applied in order, so two for one path see each other. Any other error (the store,
        or a ``seal`` callback) rolls the whole batch back and propagates.
        """
        ...

    def get_secret(self, path: str, version: int | None = None) -> SecretRow:
        """Return one version (``None`` = the current one); :class:`NotFound` if absent/pruned."""
        ...

    def secret_meta(self, path: str) -> SecretMeta:
        """Return the metadata of ``path``; :class:`NotFound` if it was never written."""
        ...

    def list_secret_paths(self, prefix: str = "", *, after: str | None = None,
                          limit: int | None = None) -> list[str]:
        """Sorted paths that start with ``prefix`` (a literal string, no wildcards).

        Keyset pagination: only paths sorting strictly after ``after`` (when given), at most
        ``limit`` (>= 1; ``None``: all) of them. Paths order by their UTF-8 bytes on every
        backend, so a listing resumed from its last path neither repeats nor skips a path
        that existed throughout, whatever was added or deleted between the pages.

        A path is listed while its metadata exists, i.e. once written it stays listed even if
        every retained version is soft-deleted or destroyed; callers filter further if needed.
        """
        ...

    def delete_versions(self, path: str, versions: Sequence[int], now: float) -> int:
        """Soft-delete versions (empty = the current one); return how many rows changed.

        Versions that do not exist (pruned) or are already deleted are ignored.
        :class:`NotFound` if the path was never written.
        """
        ...

    def undelete_versions(self, path: str, versions: Sequence[int]) -> int:
        """Clear the soft delete of versions (not destroyed ones); return rows changed.

        ``versions`` must not be empty. :class:`NotFound` if the path was never written.
        """
        ...

    def destroy_versions(self, path: str, versions: Sequence[int]) -> int:
        """Drop the ciphertext of versions for good (blob=NULL, destroyed); return rows changed.

        ``versions`` must not be empty. :class:`NotFound` if the path was never written.
        """
        ...

    # -- policies ----------------------------------------------------------------------

    def put_policy(self, name: str, generation: int, blob: bytes, now: float) -> None:
        """Create or replace a policy (``created_at`` is kept on replace)."""
        ...

    def get_policy(self, name: str) -> RecordRow:
        """Return a policy row; :class:`NotFound` if absent."""
        ...

    def list_policies(self) -> list[RecordRow]:
        """Return every policy row, sorted by name."""
        ...

    def delete_policy(self, name: str) -> bool:
        """Delete a policy; return False if it did not exist."""
        ...

    # -- rotation support --------------------------------------------------------------

    def count_by_generation(self) -> dict[int, int]:
        """Rows with a ciphertext (all kinds), counted per generation."""
        ...

    def scan_not_in_generation(self, target_generation: int, after: RecordKey | None,
                               limit: int) -> list[ScanRow]:
        """Up to ``limit`` rows with a blob whose generation != target, keys > ``after``.

        Ordered by (kind, path, version), so the last row's key is the next ``after``.
        """
        ...

    def scan_generation(self, generation: int, after: RecordKey | None,
                        limit: int) -> list[ScanRow]:
        """Like :meth:`scan_not_in_generation`, for rows whose generation == ``generation``."""
        ...

    def replace_blobs(self, updates: Sequence[BlobUpdate], *,
                      state: tuple[str, str] | None = None) -> int:
        """Apply conditional blob replacements in one transaction; return rows changed.

        ``state`` (key, value) is written in the same transaction: a job's progress
        (the rotation cursor) is durable exactly when the batch it describes is.

        A row changes only if its generation and blob still equal the expected ones, so a
        user write, delete or destroy that landed meanwhile always wins. Keys must be unique
        within one call.
        """
        ...

    # -- integrity of the plaintext columns -------------------------------------------

    def count_by_header_generation(self) -> dict[int, int]:
        """Like :meth:`count_by_generation`, but by the generation each ciphertext header
        names (the truth), whatever the ``generation`` column says; 0 counts blobs with no
        valid header."""
        ...

    def generation_mismatches(self, after: RecordKey | None,
                              limit: int) -> list[GenerationMismatch]:
        """Up to ``limit`` records (keys > ``after``, in key order) whose ``generation``
        column differs from their header, or whose header is not valid."""
        ...

    def fix_generation_cells(self, mismatches: Sequence[GenerationMismatch]) -> int:
        """Set each record's ``generation`` column to its header's generation (which must be
        valid), if the row still holds the same cell and header; return rows changed.
        Only the index column changes: never a blob, never a row removed."""
        ...

    # -- small durable documents -------------------------------------------------------

    def get_state(self, key: str) -> str | None:
        """Return a stored document (JSON text by convention) or None."""
        ...

    def states_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every document whose key starts with ``prefix``: key -> value."""
        ...

    def put_state(self, key: str, value: str) -> None:
        """Create or replace a document."""
        ...

    def swap_state(self, key: str, expected: str | None, value: str) -> bool:
        """Compare-and-set: write ``value`` only if the document is still ``expected``
        (``None``: absent). True when written. Lets several nodes agree on who owns a job."""
        ...

    def delete_state(self, key: str) -> None:
        """Remove a document (no error if absent)."""
        ...

    def wait_for_state_change(self, keys: Collection[str], timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a node to change one of the state ``keys``.

        True as soon as one was changed (PostgreSQL: LISTEN/NOTIFY, sent in the changing
        transaction, so it arrives after the commit); False when the time ran out or the
        backend cannot tell (SQLite: one process owns the file). Callers re-read what they
        follow either way: a notification is a hint, never the data.
        """
        ...

    # -- encryption counters -----------------------------------------------------------

    def add_encryptions(self, generation: int, n: int) -> None:
        """Add ``n`` to the persisted encryption count of ``generation``."""
        ...

    def encryption_counts(self) -> dict[int, int]:
        """Return the persisted encryption count per generation."""
        ...

    # -- housekeeping ------------------------------------------------------------------

    def is_empty(self) -> bool:
        """True when no record (secret or policy) exists."""
        ...

    def check_writable(self) -> None:
        """Commit a tiny write; raise :class:`StoreUnavailable` if that is impossible."""
        ...

    def close(self) -> None:
        """Release every connection. The store is unusable afterwards."""
        ...


def check_put(request: PutRequest) -> None:
    """Validate the arguments of one put."""
    check_max_versions(request.max_versions)
    check_cas(request.cas)


def check_max_versions(max_versions: int) -> None:
    """Validate the retention argument of :meth:`Store.put_secret`."""
    if max_versions < 1:
        raise ValueError(f"max_versions must be at least 1, got {max_versions}")


def check_cas(cas: int | None) -> None:
    """Validate a check-and-set argument."""
    if cas is not None and cas < 0:
        raise ValueError(f"cas must be >= 0 or None, got {cas}")


def check_limit(limit: int) -> None:
    """Validate a scan page size."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


def check_unique_keys(updates: Sequence[BlobUpdate]) -> None:
    """Reject a replace_blobs batch that names one row twice."""
    if len({u[:3] for u in updates}) != len(updates):
        raise ValueError("replace_blobs: duplicate record keys in one batch")


def check_nonempty_versions(versions: Sequence[int], operation: str) -> None:
    """Reject an empty version list where "current" is not a sensible default."""
    if not versions:
        raise ValueError(f"{operation}: at least one version is required")


def prune_bounds(new_version: int, old_oldest: int, max_versions: int) -> int:
    """Return the oldest version to keep after writing ``new_version``."""
    return max(old_oldest, new_version - max_versions + 1, 1)
