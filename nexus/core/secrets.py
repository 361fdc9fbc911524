"""Secrets: path -> versioned map<string,string>, each version encrypted under the root key.

Plaintext is canonical JSON of the map; the associated data binds the record
identity (kind, path, version) so a ciphertext moved to another row fails to
decrypt. Authorization is checked here, per path, through the policy engine.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import structlog

from nexus.audit import AuditLog
from nexus.core.counter import EncryptionCounter
from nexus.core.errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    MetadataIntegrityError,
    NexusError,
    NotFound,
    NotReady,
)
from nexus.core.integrity import reconcile_generation_cells
from nexus.core.keymanager import KeyManager
from nexus.core.policies import PolicyEngine
from nexus.core.validation import (
    MAX_PAGE_TOKEN_CHARS,
    check_data,
    check_page_size,
    check_path,
    check_prefix,
    check_versions,
)
from nexus.crypto.envelope import DecryptionError, peek_generation, record_identity
from nexus.crypto.keyring import Keyring
from nexus.crypto.keys import Purpose
from nexus.store.base import (
    KIND_SECRET,
    CasMismatch,
    InconsistentMetadata,
    PutRequest,
    SecretMeta,
    Store,
)
from nexus.store.base import NotFound as StoreNotFound
from spike.errors import ErrorKind

T = TypeVar("T")

log = structlog.get_logger("nexus.secrets")

MAX_PAGE_BYTES = 1024 * 1024
"""A list page ends before its paths (with their protobuf framing) pass this: a reply stays
far below the 4 MiB message limit, whatever the page size and the path lengths."""
PATH_OVERHEAD_BYTES = 3  # field tag + length varint of one path (<= 512 bytes)
MAX_SCANNED_PER_PAGE = 10_000
SCANNED_PER_PATH = 10
"""A page looks at no more than SCANNED_PER_PATH * page size paths (listed or hidden), and
never more than MAX_SCANNED_PER_PAGE: this bounds the work of one call."""
LIST_BATCH = 500
"""Paths read from the store per query while filling a page."""

_TOKEN_FORMAT = b"\x01"
_TOKEN_KIND = "spike/v1/list-page-token"  # noqa: S105 - a record kind
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")


def _token_identity(caller: str, prefix: str) -> bytes:
    """Associated data of a page token: it opens only for the same caller and prefix."""
    return record_identity(_TOKEN_KIND, f"{len(caller)}:{caller}/{prefix}", 0)


def _metadata_refused(exc: InconsistentMetadata, outcome: str) -> MetadataIntegrityError:
    """Log the inconsistency (version numbers only, never a value) and build the refusal."""
    log.error("secret metadata inconsistent", path=exc.path, reason=exc.reason)
    return MetadataIntegrityError(
        f"the metadata of {exc.path} contradicts its stored versions ({exc.reason}): refused, "
        f"{outcome}; repair the database or restore it (see the Nexus log)")


MAX_IMPORT_ENTRIES = 5000
"""Most entries in one import batch (one durable commit)."""


class ImportEntry(NamedTuple):
    """One line of an import (a tuple: a hundred thousand of these are made per import)."""

    line: int
    path: str
    data: Mapping[str, str]

    def __repr__(self) -> str:  # never the values: a repr can end up in a traceback or a log
        return f"ImportEntry(line={self.line}, path={self.path!r}, data=<{len(self.data)} keys>)"


@dataclass(frozen=True)
class ImportFailure:
    """One entry that was written nowhere: its line, path and why (never its value)."""

    line: int
    path: str
    kind: str
    message: str


@dataclass(frozen=True)
class ImportResult:
    """What one batch did: the paths written and skipped (in entry order) and the
    failures."""

    imported: list[str]
    skipped: list[str]
    failures: list[ImportFailure]


@dataclass(frozen=True)
class PathPage:
    paths: list[str]
    next_token: str  # "" on the last page


@dataclass(frozen=True)
class SecretVersion:
    path: str
    version: int
    data: dict[str, str] = field(repr=False)  # never the values in a repr
    created: float


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode_data(data: Mapping[str, str]) -> bytes:
    """Canonical JSON of the map (sorted keys, no spaces, UTF-8)."""
    return _CANONICAL.encode(data if isinstance(data, dict) else dict(data)).encode()


class SecretsService:
    def __init__(self, store: Store, keys: KeyManager, policies: PolicyEngine,
                 counter: EncryptionCounter, *, max_versions: int = 10,
                 max_value_bytes: int = 64 * 1024,
                 clock: Callable[[], float] = time.time,
                 audit: AuditLog | None = None) -> None:
        self._store = store
        self._keys = keys
        self._policies = policies
        self._counter = counter
        self._max_versions = max_versions
        self._max_value_bytes = max_value_bytes
        self._clock = clock
        self._audit = audit
        # Registered before the rotation engine's listener (the node builds this first), so
        # a resumed rotation already sees truthful generation cells.
        keys.on_unsealed(self._reconcile_generations)

    def _reconcile_generations(self) -> None:
        """After every unseal: a generation cell that disagrees with its ciphertext header
        is logged and, where this node holds the header's key, set to the header's value."""
        report = reconcile_generation_cells(self._store, self._keys.keyring.generations)
        if report.mismatched and self._audit is not None:
            self._audit.record(
                "store.generation_cells", caller="(nexus)", target="records",
                outcome="repaired" if report.fixed == report.mismatched else "integrity",
                durable=True, mismatched=report.mismatched, fixed=report.fixed,
                unreadable=report.unreadable, other_generation=report.unheld,
                records=[f"{m.kind} {m.path} v{m.version}: cell {m.cell}, header {m.header}"
                         for m in report.examples])

    def put(self, caller: str, path: str, data: Mapping[str, str], cas: int | None) -> int:
        check_path(path)
        check_data(data, self._max_value_bytes)
        self._policies.require(caller, path, "write")
        plaintext = encode_data(data)
        used: list[int] = []

        def seal(version: int) -> tuple[int, bytes]:
            # Grab the keyring inside the transaction: a rotation that switched the
            # active generation meanwhile is honoured.
            keyring = self._keys.require_unsealed()
            self._keys.assert_current(keyring)
            generation = keyring.active_generation
            assert generation is not None
            used.append(generation)
            return generation, keyring.encrypt(
                Purpose.SECRETS, plaintext, record_identity(KIND_SECRET, path, version))

        try:
            version = self._catching_up(lambda: self._store.put_secret(
                path, cas=cas, max_versions=self._max_versions, now=self._clock(), seal=seal))
        except CasMismatch as exc:
            raise Conflict(f"check-and-set failed for {path}: expected version "
                           f"{exc.expected}, current is {exc.actual}") from None
        except InconsistentMetadata as exc:
            raise _metadata_refused(exc, "nothing was written") from None
        for generation in used:
            self._counter.add(generation)
        return version

    def _catching_up(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; when it meets a generation another node made and this one lacks yet
        (a rotation elsewhere), catch up with the keyring of record and run it once more.
        Still stale after that (this node holds no parent of it): the error stands."""
        try:
            return fn()
        except NotReady as exc:
            if exc.kind is not ErrorKind.STALE or not self._keys.follow().added:
                raise
        return fn()

    def import_batch(self, caller: str, entries: Sequence[ImportEntry], *,
                     skip_existing: bool = False) -> ImportResult:
        """Write a batch of entries in one durable commit, each as :meth:`put` would (same
        checks; with ``skip_existing``, check-and-set 0 and a path that exists is skipped).
        An entry refused for any reason is written nowhere and reported; the others commit.
        Anything that is not about one entry (sealed, stale, the store failing) fails the
        whole batch, and nothing of it is written."""
        if len(entries) > MAX_IMPORT_ENTRIES:
            raise InvalidInput(f"an import batch holds at most {MAX_IMPORT_ENTRIES} entries")
        self._keys.require_unsealed()
        failures: list[ImportFailure] = []
        accepted: list[ImportEntry] = []
        requests: list[PutRequest] = []
        used: dict[int, int] = {}
        cas = 0 if skip_existing else None
        now = self._clock()
        max_bytes, max_versions = self._max_value_bytes, self._max_versions
        allowed = self._policies.allowed
        for entry in entries:
            path = entry.path
            try:
                check_path(path)
                check_data(entry.data, max_bytes)
                if not allowed(caller, path, "write"):
                    self._policies.require(caller, path, "write")  # raises Forbidden
            except NexusError as exc:
                failures.append(ImportFailure(entry.line, path, exc.kind.value, str(exc)))
                continue
            accepted.append(entry)
            requests.append(PutRequest(path, cas, max_versions, now,
                                       self._sealer(path, encode_data(entry.data), used)))
        try:
            outcomes = (self._catching_up(lambda: self._store.put_secrets(requests))
                        if requests else [])
        finally:
            # Every encryption counts, even those of a batch that was rolled back.
            for generation, count in used.items():
                self._counter.add(generation, count)
        imported: list[str] = []
        skipped: list[str] = []
        for entry, outcome in zip(accepted, outcomes, strict=True):
            if isinstance(outcome, int):
                imported.append(entry.path)
            elif isinstance(outcome, CasMismatch):
                skipped.append(entry.path)
            else:
                refused = _metadata_refused(outcome, "nothing was written")
                failures.append(ImportFailure(entry.line, entry.path, refused.kind.value,
                                              str(refused)))
        failures.sort(key=lambda f: f.line)
        return ImportResult(imported, skipped, failures)

    def _sealer(self, path: str, plaintext: bytes,
                used: dict[int, int]) -> Callable[[int], tuple[int, bytes]]:
        """``seal`` for one import entry, as :meth:`put`'s: the keyring is taken inside the
        transaction. ``used`` counts encryptions per generation (for the counter)."""
        keys = self._keys

        def seal(version: int) -> tuple[int, bytes]:
            keyring = keys.require_unsealed()
            keys.assert_current(keyring)
            generation = keyring.active_generation
            assert generation is not None
            used[generation] = used.get(generation, 0) + 1
            return generation, keyring.encrypt(
                Purpose.SECRETS, plaintext, record_identity(KIND_SECRET, path, version))

        return seal

    def get(self, caller: str, path: str, version: int | None = None) -> SecretVersion:
        return self._catching_up(lambda: self._get(caller, path, version))

    def _get(self, caller: str, path: str, version: int | None = None) -> SecretVersion:
        check_path(path)
        self._policies.require(caller, path, "read")
        keyring = self._keys.require_unsealed()
        try:
            row = self._store.get_secret(path, version or None)
        except StoreNotFound:
            what = f"version {version} of {path}" if version else path
            raise NotFound(f"no secret {what}") from None
        if row.destroyed or row.blob is None:
            raise NotFound(f"version {row.version} of {path} was destroyed")
        if row.deleted:
            raise NotFound(f"version {row.version} of {path} is deleted (undelete it to read)")
        try:
            plain = keyring.decrypt(Purpose.SECRETS, row.blob,
                                    record_identity(KIND_SECRET, path, row.version))
        except DecryptionError:
            self._raise_if_stale(keyring, row.blob)
            log.error("secret failed its integrity check", path=path, version=row.version)
            raise IntegrityError(f"version {row.version} of {path} failed its integrity "
                                 "check") from None
        return SecretVersion(path, row.version, json.loads(plain.decode()), row.created_at)

    def _raise_if_stale(self, keyring: Keyring, blob: bytes) -> None:
        """A record under a generation this Nexus created but this node does not hold
        means the node is stale; any other undecryptable record is an integrity failure
        (e.g. a header rewritten to a generation that never existed)."""
        try:
            generation = peek_generation(blob)
        except DecryptionError:
            return
        if (generation not in keyring.generations
                and generation in self._keys.generations_recorded()):
            raise NotReady(ErrorKind.STALE,
                           f"this record is under root key generation {generation}, "
                           "which this node does not hold: run `spike recover` on this node "
                           "with the current backup")

    def list_page(self, caller: str, prefix: str, page_size: int = 0,
                  page_token: str = "") -> PathPage:
        """One page of the paths under ``prefix`` that ``caller`` may list.

        Keyset pagination on the path: the token carries the last path this page *decided
        on* (listed or hidden), encrypted and bound to the caller and the prefix, so it
        reveals no hidden path and cannot be edited to start anywhere else. A page ends at
        ``page_size`` paths, at :data:`MAX_PAGE_BYTES` of paths, or once it has looked at
        its share of paths (:data:`SCANNED_PER_PATH`; a page that covered only hidden paths
        is empty but still has a successor).
        """
        check_prefix(prefix)
        size = check_page_size(page_size)
        keyring = self._keys.require_unsealed()
        after = self._open_page_token(keyring, caller, prefix, page_token) if page_token \
            else None
        budget = min(MAX_SCANNED_PER_PAGE, SCANNED_PER_PATH * size)
        paths: list[str] = []
        used = scanned = 0
        more = False
        batch = min(LIST_BATCH, budget + 1)
        while not more:
            found = self._store.list_secret_paths(prefix, after=after, limit=batch)
            for path in found:
                if len(paths) >= size or scanned >= budget:
                    more = True
                    break
                if self._policies.allowed(caller, path, "list"):
                    cost = len(path.encode()) + PATH_OVERHEAD_BYTES
                    if cost > MAX_PAGE_BYTES:
                        # Only an edited database holds such a path (the API admits 512
                        # characters): skipped, or the listing could never pass it.
                        log.error("stored secret path too long to list; skipped",
                                  length=len(path))
                    elif used + cost > MAX_PAGE_BYTES:
                        more = True
                        break
                    else:
                        paths.append(path)
                        used += cost
                after = path
                scanned += 1
            if len(found) < batch:
                break
        token = ""
        if more and after is not None:
            token = self._seal_page_token(keyring, caller, prefix, after)
        return PathPage(paths, token)

    def _seal_page_token(self, keyring: Keyring, caller: str, prefix: str, after: str) -> str:
        generation = keyring.active_generation
        assert generation is not None
        blob = keyring.encrypt(Purpose.METADATA, _TOKEN_FORMAT + after.encode(),
                               _token_identity(caller, prefix))
        self._counter.add(generation)
        return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")

    def _open_page_token(self, keyring: Keyring, caller: str, prefix: str, token: str) -> str:
        invalid = InvalidInput(
            "invalid page token: it was altered, belongs to another listing (another caller "
            "or prefix) or was made under a root key that has since been retired; list again "
            "without a token")
        if len(token) > MAX_PAGE_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(token):
            raise invalid
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            plain = keyring.decrypt(Purpose.METADATA, blob, _token_identity(caller, prefix))
            if not plain.startswith(_TOKEN_FORMAT):
                raise invalid
            after = plain[len(_TOKEN_FORMAT):].decode()
        except (ValueError, DecryptionError):
            raise invalid from None
        if not after.startswith(prefix):
            raise invalid
        return after

    def metadata(self, caller: str, path: str) -> SecretMeta:
        check_path(path)
        self._policies.require(caller, path, "read")
        self._keys.require_unsealed()
        try:
            return self._store.secret_meta(path)
        except StoreNotFound:
            raise NotFound(f"no secret {path}") from None
        except InconsistentMetadata as exc:
            raise _metadata_refused(exc, "its versions are still stored") from None

    def _versions(self, path: str, versions: list[int], *, required: bool = False) -> list[int]:
        if required and not versions:
            raise InvalidInput(f"name the versions of {path} (--version N)")
        return check_versions(versions)

    def delete(self, caller: str, path: str, versions: list[int]) -> int:
        check_path(path)
        self._policies.require(caller, path, "write")
        self._keys.require_unsealed()
        try:
            return self._store.delete_versions(path, self._versions(path, versions),
                                               self._clock())
        except StoreNotFound:
            raise NotFound(f"no secret {path}") from None

    def undelete(self, caller: str, path: str, versions: list[int]) -> int:
        check_path(path)
        self._policies.require(caller, path, "write")
        self._keys.require_unsealed()
        try:
            return self._store.undelete_versions(path, self._versions(path, versions,
                                                                         required=True))
        except StoreNotFound:
            raise NotFound(f"no secret {path}") from None

    def destroy(self, caller: str, path: str, versions: list[int]) -> int:
        check_path(path)
        self._policies.require(caller, path, "write")
        self._keys.require_unsealed()
        try:
            return self._store.destroy_versions(path, self._versions(path, versions,
                                                                       required=True))
        except StoreNotFound:
            raise NotFound(f"no secret {path}") from None
