"""Policies: who (SPIFFE ID pattern) may do what (permissions) where (path pattern).

Patterns are RE2 expressions matched in full (anchored), so evaluation is
linear in the input and a hostile pattern cannot stall Nexus. Default deny.
The superuser Pilot identity may do everything. Policies are stored encrypted
(purpose POLICIES, identity bound to the policy name) and cached in memory;
the cache is rebuilt on every change here and at most ``cache_seconds`` after
a change made by another Nexus node sharing the store.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import re2
import structlog

from nexus.core.counter import EncryptionCounter
from nexus.core.errors import Forbidden, IntegrityError, InvalidInput, NotFound
from nexus.core.keymanager import KeyManager
from nexus.core.validation import MAX_PATTERN_CHARS, check_policy_name
from nexus.crypto.envelope import DecryptionError, record_identity
from nexus.crypto.keys import Purpose
from nexus.store.base import KIND_POLICY, POLICY_VERSION, Store
from nexus.store.base import NotFound as StoreNotFound
from spike.permissions import PERMISSIONS

log = structlog.get_logger("nexus.policies")

# RE2 memory budget per compiled pattern: bounds what a hostile pattern can cost.
_RE2_MAX_MEM = 1 << 20
DECISION_CACHE_ENTRIES = 10_000
DECISION_CACHE_MAX_KEY_CHARS = 4096  # longer (caller, path) pairs are decided, not kept


@dataclass(frozen=True)
class Policy:
    name: str
    spiffe_id_pattern: str
    path_pattern: str
    permissions: frozenset[str]
    created: float = 0.0
    updated: float = 0.0

    def to_json(self, updated: float | None = None) -> bytes:
        """The stored document; ``updated`` (the time of this write) when given."""
        doc: dict[str, object] = {
            "name": self.name,
            "spiffe_id_pattern": self.spiffe_id_pattern,
            "path_pattern": self.path_pattern,
            "permissions": sorted(self.permissions),
        }
        if updated is not None:
            doc["updated"] = updated
        return json.dumps(doc, sort_keys=True).encode()


@dataclass(frozen=True)
class _Compiled:
    policy: Policy
    spiffe_id: Any
    path: Any


def compile_pattern(pattern: str, what: str) -> Any:
    if not pattern:
        raise InvalidInput(f"the {what} pattern is empty")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidInput(f"the {what} pattern is longer than {MAX_PATTERN_CHARS} characters")
    options = re2.Options()
    options.max_mem = _RE2_MAX_MEM
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        raise InvalidInput(f"the {what} pattern is not a valid RE2 expression: "
                           f"{_re2_reason(exc)} (RE2 has no backreferences or lookaround)"
                           ) from None


def _re2_reason(exc: Exception) -> str:
    """RE2's own reason (``missing ): a(``), as text, bounded like the pattern it quotes."""
    reason = exc.args[0] if exc.args else ""
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return str(reason)[:MAX_PATTERN_CHARS + 64] or "unknown error"


def validate_policy(policy: Policy) -> Policy:
    check_policy_name(policy.name)
    unknown = set(policy.permissions) - set(PERMISSIONS)
    if unknown or not policy.permissions:
        raise InvalidInput(f"permissions must be a non-empty subset of {', '.join(PERMISSIONS)}")
    compile_pattern(policy.spiffe_id_pattern, "SPIFFE ID")
    compile_pattern(policy.path_pattern, "path")
    return policy


class PolicyEngine:
    def __init__(self, store: Store, keys: KeyManager, superuser_id: str,
                 counter: EncryptionCounter, cache_seconds: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keys = keys
        self._superuser = superuser_id
        self._counter = counter
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: tuple[float, list[_Compiled]] | None = None
        self._invalidations = 0
        self._decisions: tuple[list[_Compiled] | None, dict[tuple[str, str, str], bool]] = (
            None, {})

    # ------------------------------------------------------------------ decisions

    def allowed(self, caller: str, path: str, permission: str) -> bool:
        if caller == self._superuser:
            return True
        policies = self._policies()
        # Decisions are remembered for as long as this exact set of compiled policies is
        # the current one: a policy change (or the periodic reload) starts a new table.
        # Each RE2 match releases the GIL, which under concurrent reads costs far more
        # than the match itself.
        decisions = self._decisions
        if decisions[0] is not policies:
            decisions = self._decisions = (policies, {})
        key = (caller, path, permission)
        known = decisions[1].get(key)
        if known is not None:
            return known
        verdict = any(
            (permission in c.policy.permissions or "super" in c.policy.permissions)
            and c.spiffe_id.fullmatch(caller) and c.path.fullmatch(path)
            for c in policies)
        if len(caller) + len(path) <= DECISION_CACHE_MAX_KEY_CHARS:
            table = decisions[1]
            if len(table) >= DECISION_CACHE_ENTRIES:
                table.clear()
            table[key] = verdict
        return verdict

    def require(self, caller: str, path: str, permission: str) -> None:
        if not self.allowed(caller, path, permission):
            raise Forbidden(f"no policy allows {caller} to {permission} {path}")

    def _cached(self) -> list[_Compiled] | None:
        """The compiled policies if the cache is fresh, else None."""
        cached = self._cache
        if cached is not None and time.monotonic() - cached[0] < self._cache_seconds:
            return cached[1]
        return None

    def _policies(self) -> list[_Compiled]:
        compiled = self._cached()
        if compiled is not None:
            return compiled
        with self._lock:
            # Again under the lock: the threads that queued here while one rebuilt the
            # cache take its result instead of each rebuilding it once more.
            compiled = self._cached()
            if compiled is not None:
                return compiled
            loaded_at, invalidations = time.monotonic(), self._invalidations
            compiled = self._load()
            # A change that landed while this list was read (invalidate() ran meanwhile)
            # may be missing from it: it serves this caller, but is not kept.
            if invalidations == self._invalidations:
                self._cache = (loaded_at, compiled)
        return compiled

    def _load(self) -> list[_Compiled]:
        compiled = []
        for row in self._store.list_policies():
            try:
                policy = self._decode(row)
            except DecryptionError:
                # Deny-safe: a tampered policy grants nothing; the rest still apply.
                log.error("policy failed its integrity check; ignored", policy=row.path)
                continue
            compiled.append(_Compiled(
                policy, compile_pattern(policy.spiffe_id_pattern, "SPIFFE ID"),
                compile_pattern(policy.path_pattern, "path")))
        return compiled

    def invalidate(self) -> None:
        self._invalidations += 1
        self._cache = None

    # ------------------------------------------------------------------ CRUD (superuser)

    def _decode(self, row: Any) -> Policy:
        keyring = self._keys.require_unsealed()
        plain = keyring.decrypt(Purpose.POLICIES, row.blob,
                                record_identity(KIND_POLICY, row.path, POLICY_VERSION))
        doc = json.loads(plain)
        # The store keeps a policy's creation time on replace; the time of its last
        # write is in the (authenticated) document. A document written before that time
        # was kept there has none: its creation time stands in.
        return Policy(doc["name"], doc["spiffe_id_pattern"], doc["path_pattern"],
                      frozenset(doc["permissions"]), row.created_at,
                      float(doc.get("updated", row.created_at)))

    def put(self, policy: Policy) -> Policy:
        validate_policy(policy)
        keyring = self._keys.require_unsealed()
        self._keys.assert_current(keyring)
        generation = keyring.active_generation
        assert generation is not None
        now = self._clock()
        blob = keyring.encrypt(Purpose.POLICIES, policy.to_json(updated=now),
                               record_identity(KIND_POLICY, policy.name, POLICY_VERSION))
        self._store.put_policy(policy.name, generation, blob, now)
        self._counter.add(generation)
        self.invalidate()
        return self.get(policy.name)

    def get(self, name: str) -> Policy:
        check_policy_name(name)
        try:
            row = self._store.get_policy(name)
        except StoreNotFound:
            raise NotFound(f"no policy named {name}") from None
        try:
            return self._decode(row)
        except DecryptionError:
            log.error("policy failed its integrity check", policy=name)
            raise IntegrityError(f"policy {name} failed its integrity check") from None

    def list(self) -> list[Policy]:
        self._keys.require_unsealed()
        policies = []
        for row in self._store.list_policies():
            try:
                policies.append(self._decode(row))
            except DecryptionError:
                # Same as the engine: a tampered policy is left out (and logged), the rest
                # are still listed.
                log.error("policy failed its integrity check; ignored", policy=row.path)
        return policies

    def delete(self, name: str) -> None:
        check_policy_name(name)
        if not self._store.delete_policy(name):
            raise NotFound(f"no policy named {name}")
        self.invalidate()
