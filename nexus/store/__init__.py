"""Storage layer: the :class:`Store` protocol and its SQLite and PostgreSQL backends.

The store only ever sees ciphertext blobs plus plaintext indexing columns; it does no crypto.
The contract is :mod:`nexus.store.base`; the SQL both backends share is :mod:`nexus.store.sql`.
"""

from __future__ import annotations

import os

from nexus.store.base import (
    KIND_POLICY,
    KIND_SECRET,
    POLICY_VERSION,
    BlobUpdate,
    CasMismatch,
    ConstraintViolation,
    NotFound,
    PutOutcome,
    PutRequest,
    RecordKey,
    RecordRow,
    ScanRow,
    SchemaTooNew,
    Seal,
    SecretMeta,
    SecretRow,
    Store,
    StoreError,
    StoreUnavailable,
    VersionInfo,
)

STORE_KINDS = ("sqlite", "postgres")
"""Values accepted by :func:`open_store` (and by ``spike-nexus --store``)."""


def open_store(kind: str, *, path: str | os.PathLike[str] | None = None,
               dsn: str | None = None, group_commit: bool = True) -> Store:
    """Open a store of ``kind``: ``"sqlite"`` needs ``path``, ``"postgres"`` needs ``dsn``.

    ``group_commit`` (SQLite) lets concurrent puts share one commit; PostgreSQL's server
    already flushes concurrent commits together, so it ignores the switch.

    Pending schema migrations are applied; :class:`SchemaTooNew` is raised when the database
    is newer than this code, :class:`StoreUnavailable` when it cannot be reached.
    """
    if kind == "sqlite":
        if path is None or not os.fspath(path):
            raise ValueError("the sqlite store needs a database file path")
        if dsn is not None:
            raise ValueError("the sqlite store takes a path, not a DSN")
        from nexus.store.sqlite import SqliteStore

        return SqliteStore.open(path, group_commit=group_commit)
    if kind == "postgres":
        if not dsn:
            raise ValueError("the postgres store needs a DSN (for example 'host=... dbname=...')")
        if path is not None:
            raise ValueError("the postgres store takes a DSN, not a path")
        from nexus.store.postgres import PostgresStore

        return PostgresStore.open(dsn)
    raise ValueError(f"unknown store kind {kind!r}; expected one of: {', '.join(STORE_KINDS)}")


__all__ = [
    "KIND_POLICY",
    "KIND_SECRET",
    "POLICY_VERSION",
    "STORE_KINDS",
    "BlobUpdate",
    "CasMismatch",
    "ConstraintViolation",
    "NotFound",
    "PutOutcome",
    "PutRequest",
    "RecordKey",
    "RecordRow",
    "ScanRow",
    "SchemaTooNew",
    "Seal",
    "SecretMeta",
    "SecretRow",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "VersionInfo",
    "open_store",
]
