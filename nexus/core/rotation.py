"""Root key rotation: online re-encryption of every stored record, crash-safe.

Phases (docs/runbooks/rotation.md follows them for the operator):

1. ``precheck``  unsealed, store writable, free space, backup present and matching,
                 no rotation running;
2. ``new_key``   RK(g+1) is generated and sealed into the backup *before* anything is
                 written under it; new writes use g+1 at once;
3. ``reencrypt`` batches of records not yet under g+1: decrypt, encrypt under g+1,
                 conditional write (a user write that landed meanwhile wins);
                 throttled; the cursor is persisted after every batch;
4. ``validate``  nothing left outside g+1, every record decrypts under g+1;
5. ``finalize``  g is dropped from the backup first, then wiped from memory.

``rollback`` (abort) moves records back under g and drops g+1. The job's state
lives in the store (state key ``rotation``) so that after a crash and
``spike recover`` the rotation resumes by itself. Progress is published as
events with a monotone sequence number; any number of watchers read them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from nexus.audit import AuditLog
from nexus.core import testpoints
from nexus.core.counter import EncryptionCounter
from nexus.core.errors import Conflict, InvalidInput, NotFound, NotReady, Unavailable
from nexus.core.integrity import reconcile_generation_cells
from nexus.core.keymanager import KeyManager
from nexus.crypto import envelope
from nexus.crypto.keyring import Keyring
from nexus.crypto.keys import Purpose
from nexus.store.base import KIND_SECRET, BlobUpdate, RecordKey, ScanRow, Store, StoreError
from spike.errors import ErrorKind

log = structlog.get_logger("nexus.rotation")

STATE_KEY = "rotation"

PRECHECK = "precheck"
NEW_KEY = "new_key"
REENCRYPT = "reencrypt"
VALIDATE = "validate"
FINALIZE = "finalize"
ROLLBACK = "rollback"
COMPLETED = "completed"
FAILED = "failed"
ABORTED = "aborted"
IDLE = "idle"
TERMINAL = frozenset({COMPLETED, FAILED, ABORTED})

DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_RATE = 2_000  # records/s when throttled (tests/bench_rotation.py: get p99)
# Unthrottled rotations amortize each durable commit over more records.
EMERGENCY_BATCH_SIZE = 2000
MAX_BATCH_SIZE = 10_000
# Validation only reads, so its batch is about scan speed alone: 500 rows per SELECT
# scanned ~25 % faster than 2,000 or 10,000 here (smaller result lists stay in cache).
VALIDATE_BATCH_SIZE = 500
MIN_FREE_BYTES = 64 * 1024 * 1024
# Seconds between recording a new generation and dropping the old one when several
# nodes share the store (see finalize): twice KeyManager.assert_current's refresh.
STALE_NODE_GRACE = 2.0
# A FAILED phase the store refused to save (disk full, store down) is retried this often
# (doubling from the first) until it is saved or superseded.
FAILURE_SAVE_FIRST_RETRY = 0.5
FAILURE_SAVE_MAX_RETRY = 10.0
# failure_kind of a FAILED rotation (RotationEvent.failure_kind, metric label).
FAILURE_STORE = "store"  # the database or a file in the data directory refused an operation
FAILURE_INTEGRITY = "integrity"  # records that do not decrypt under their own key
FAILURE_VALIDATION = "validation"  # a record does not decrypt under the new key
FAILURE_ROLLBACK = "rollback"  # a rollback left records under the new key
FAILURE_INTERNAL = "internal"  # anything else (a bug): the log has the traceback
FAILURE_KINDS = (FAILURE_STORE, FAILURE_INTEGRITY, FAILURE_VALIDATION, FAILURE_ROLLBACK,
                 FAILURE_INTERNAL)


@dataclass(frozen=True)
class RotationState:
    """One rotation's progress: persisted after every step, published as events."""

    rotation_id: str
    phase: str
    from_generation: int
    to_generation: int = 0
    emergency: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    max_rate: int = DEFAULT_MAX_RATE
    reason: str = ""
    caller: str = ""
    total: int = 0
    done: int = 0
    reencrypted: int = 0
    skipped: int = 0
    failed: int = 0
    rate: float = 0.0
    eta: float = 0.0
    message: str = ""
    started: float = 0.0
    updated: float = 0.0
    sequence: int = 0
    cursor: tuple[str, str, int] | None = None
    node: str = ""  # the Nexus node that drives it (several may share a store)
    # Set when an operator asked to abort; persisted so that a crash or a restart
    # before the rollback starts does not lose the request.
    abort_requested: bool = False
    # FAILED only: what kind of failure (FAILURE_KINDS) and the phase it stopped in.
    failure_kind: str = ""
    failed_in_phase: str = ""
    # FAILED only: the store refused to save the failure; this process alone knows it
    # (and keeps trying to save it). Never true in the stored document.
    failure_unsaved: bool = False

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RotationState:
        doc = json.loads(text)
        if doc.get("cursor") is not None:
            doc["cursor"] = tuple(doc["cursor"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})


# Generation numbers start at 1: "every record not under generation 0" is every record.
EVERY_GENERATION = 0


def purpose_for(kind: str) -> Purpose:
    return Purpose.SECRETS if kind == KIND_SECRET else Purpose.POLICIES


def _resealer(keyring: Keyring, kind: str, target: int) -> envelope.Resealer:
    """Opens ``kind`` records under any generation held, seals them under ``target``."""
    purpose = purpose_for(kind)
    return envelope.Resealer(
        kind, {g: keyring.entry(g).aead(purpose) for g in keyring.generations},
        keyring.entry(target).aead(purpose), target)


@dataclass
class _Stop:
    """Why the worker should stop at the next batch boundary."""

    shutdown: threading.Event = field(default_factory=threading.Event)
    abort: threading.Event = field(default_factory=threading.Event)


class RotationEngine:
    def __init__(
        self,
        store: Store,
        keys: KeyManager,
        counter: EncryptionCounter,
        audit: AuditLog,
        *,
        data_dir: Path | None = None,
        node_name: str = "",
        stale_node_grace: float = 0.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._store = store
        self._node_name = node_name
        # Only a store shared by several nodes needs the wait before the old key goes.
        self._stale_node_grace = stale_node_grace
        self._keys = keys
        self._counter = counter
        self._audit = audit
        self._data_dir = data_dir
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # A FAILED state the store refused to save: it stands in for the stored (older,
        # non-terminal) one until it is saved or a newer state is.
        self._unsaved: RotationState | None = None
        self._state: RotationState | None = self._load()
        self._thread: threading.Thread | None = None
        self._stop = _Stop()
        self._listeners: list[Callable[[RotationState], None]] = []
        self._saver: threading.Thread | None = None
        self._closing = threading.Event()

    # ------------------------------------------------------------------ queries

    def _load(self) -> RotationState | None:
        raw = self._store.get_state(STATE_KEY)
        return self._overlay(RotationState.from_json(raw) if raw else None)

    def _overlay(self, stored: RotationState | None) -> RotationState | None:
        """The stored state, unless this process holds a newer FAILED one of the same
        rotation that the store refused to save."""
        pending = self._unsaved
        if pending is not None and stored is not None \
                and stored.rotation_id == pending.rotation_id \
                and stored.sequence < pending.sequence:
            return pending
        return stored

    @property
    def current(self) -> RotationState | None:
        """The running rotation, or the last one (terminal), or None.

        When no worker runs here the stored state is authoritative: another node
        sharing the store may be the one rotating.
        """
        if not self.running():
            try:
                stored = self._load()
            except StoreError:
                return self._state  # the store is down: the last known state
            with self._lock:
                if not self.running():
                    self._state = stored
        return self._state

    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def orphaned(self) -> bool:
        """A rotation of this node is neither terminal nor driven by a worker while Nexus
        is unsealed: nothing will move it on (the metric and alert for a dead worker)."""
        if self.running() or not self._keys.is_unsealed():
            return False
        state = self.current
        return state is not None and not state.terminal \
            and state.node in ("", self._node_name) and not self.running()

    def add_listener(self, listener: Callable[[RotationState], None]) -> None:
        self._listeners.append(listener)

    def watch(self, timeout: float = 15.0) -> Iterator[RotationState]:
        """A snapshot first, then each new state, until a terminal one.

        Yields the unchanged state again every ``timeout`` seconds as a keep-alive,
        so a caller can notice its client has gone.
        """
        with self._lock:
            state = self._state
        if state is None:
            return
        yield state
        last = state.sequence
        while not state.terminal:
            with self._changed:
                self._changed.wait_for(
                    lambda seen=last: self._state is not None  # type: ignore[misc]
                    and self._state.sequence != seen,
                    timeout=timeout,
                )
                state = self._state
            assert state is not None
            if state.sequence == last and not state.terminal:
                if not self.running() and self._stop.shutdown.is_set():
                    return  # Nexus is stopping: the watcher reconnects later
                yield state  # keep-alive
                continue
            last = state.sequence
            yield state

    # ------------------------------------------------------------------ commands

    def start(
        self,
        *,
        caller: str,
        emergency: bool = False,
        batch_size: int = 0,
        max_rate: int = 0,
        reason: str = "",
    ) -> RotationState:
        if batch_size < 0 or batch_size > MAX_BATCH_SIZE:
            raise InvalidInput(f"--batch-size must be in 1..{MAX_BATCH_SIZE}")
        if max_rate < 0:
            raise InvalidInput("--max-rate must be >= 0")
        finishing = self._thread
        if finishing is not None and self._state is not None and self._state.terminal:
            finishing.join(10.0)  # it published its terminal state and is writing the audit
        with self._lock, _store_errors("start a rotation"):
            # The store decides, not this process's memory: several nodes may share it.
            stored_raw = self._store.get_state(STATE_KEY)
            previous = self._overlay(RotationState.from_json(stored_raw) if stored_raw
                                     else None)
            self._state = previous
            if self.running() or (previous is not None and not previous.terminal):
                where = f" on node {previous.node}" if previous and previous.node and \
                    previous.node != self._node_name else ""
                raise Conflict(f"a rotation is already running{where}: watch it with "
                               "`spike rotation watch` or stop it with `spike rotation abort`")
            if previous is not None and previous.phase == FAILED:
                raise Conflict("the last rotation failed: fix its cause, then "
                               "`spike rotation resume` or `spike rotation abort`")
            keyring = self._keys.require_unsealed()
            active = keyring.active_generation
            assert active is not None
            now = self._clock()
            state = RotationState(
                rotation_id=uuid.uuid4().hex[:12],
                phase=PRECHECK,
                from_generation=active,
                emergency=emergency,
                batch_size=batch_size or (EMERGENCY_BATCH_SIZE if emergency
                                          else DEFAULT_BATCH_SIZE),
                max_rate=0 if emergency else (max_rate or DEFAULT_MAX_RATE),
                reason=reason,
                caller=caller,
                started=now,
                updated=now,
                sequence=(previous.sequence + 1) if previous else 1,
                node=self._node_name,
            )
            self._precheck(state)
            # Claim the job with a compare-and-set: of two nodes starting at once, one wins.
            self._publish_locked(state, claim=True, expected_raw=stored_raw)
        # The job is claimed: a worker must drive it even if the audit cannot be written
        # now (a full disk: the line stays queued in the audit log; the worker will fail
        # visibly on its first write).
        self._record_quietly("rotation.start", caller=caller, target=state.rotation_id,
                             from_generation=active, emergency=emergency, reason=reason)
        self._spawn()
        return state

    def abort(self, caller: str, reason: str = "") -> RotationState:
        self.current  # noqa: B018 - refresh from the store when no worker runs here
        with self._lock:
            state = self._state
            if state is None or (state.terminal and state.phase != FAILED):
                raise NotFound("no rotation to abort")
            if state.node and state.node != self._node_name and not state.terminal:
                raise Conflict(f"the rotation runs on node {state.node}: abort it there; if "
                               "that node is gone for good, `spike rotation resume` here first")
            if state.phase in (FINALIZE,):
                raise Conflict("the rotation is finalizing and can no longer be aborted")
        with _store_errors("abort the rotation"):  # audited before anything is done
            self._audit.record("rotation.abort", caller=caller, target=state.rotation_id,
                               outcome="ok", durable=True, reason=reason)
        if self.running():
            self._stop.abort.set()
            with self._lock:  # persist the request: a crash before the worker sees it
                current = self._state
                if current is not None and current.phase not in (ROLLBACK, FINALIZE) \
                        and not current.terminal:
                    try:
                        self._publish_locked(replace(current, abort_requested=True))
                    except StoreError as exc:  # the worker still sees the request
                        log.warning("abort request not saved; the worker rolls back anyway",
                                    error=_store_detail(exc))
        else:
            with _store_errors("abort the rotation"):
                self._enter_rollback(state, f"abort requested by {caller}")
            self._spawn()
        return state

    def resume(self, caller: str) -> RotationState:
        self.current  # noqa: B018 - refresh from the store when no worker runs here
        with self._lock, _store_errors("resume the rotation"):
            state = self._state
            if state is None or state.phase in (COMPLETED, ABORTED):
                raise NotFound("no interrupted or failed rotation to resume")
            if self.running():
                raise Conflict("the rotation is already running")
            if state.phase == FAILED:
                if state.failed_in_phase == ROLLBACK:
                    phase = ROLLBACK  # an abort that failed goes on rolling back
                else:
                    # A failure before the new key was in place (to_generation still 0)
                    # resumes at the new-key step, which picks up a key already added.
                    phase = REENCRYPT if state.to_generation else NEW_KEY
                # After a store failure the saved cursor is good: continue from it.
                # Records that failed their integrity check are tried again from the start.
                keep_cursor = state.failure_kind == FAILURE_STORE and phase == REENCRYPT \
                    and state.failed_in_phase == REENCRYPT and not state.failed
                self._publish_locked(replace(
                    state, phase=phase, cursor=state.cursor if keep_cursor else None,
                    failed=0, abort_requested=False, node=self._node_name,
                    failure_kind="", failed_in_phase="", failure_unsaved=False,
                    message=f"resumed by {caller}"))
            elif state.node != self._node_name:  # an operator moves the job here
                self._publish_locked(replace(state, node=self._node_name,
                                             message=f"taken over by {caller}"))
        self._record_quietly("rotation.resume", caller=caller, target=state.rotation_id)
        self._spawn()
        assert self._state is not None
        return self._state

    def resume_after_unseal(self) -> bool:
        """Called when Nexus unseals: continue an interrupted rotation by itself —
        only one this node started; another node's job is that node's (or an
        operator's explicit `spike rotation resume`)."""
        state = self._load()
        with self._lock:
            self._state = state
        if state is None or state.terminal or self.running():
            return False
        if state.node and state.node != self._node_name:
            log.warning("interrupted rotation belongs to another node; not resuming here",
                        rotation_id=state.rotation_id, node=state.node)
            return False
        log.info("resuming interrupted rotation", rotation_id=state.rotation_id,
                 phase=state.phase)
        self._record_quietly("rotation.resume", caller="(nexus)", target=state.rotation_id,
                             phase=state.phase)
        self._spawn()
        return True

    def _record_quietly(self, action: str, *, caller: str, target: str,
                        outcome: str = "ok", **detail: Any) -> None:
        """A durable audit event after the fact it records: a failed write (disk full) is
        logged, not raised (the audit log keeps the line and writes it with its next
        event), so that it never leaves a claimed rotation without a worker."""
        try:
            self._audit.record(action, caller=caller, target=target, outcome=outcome,
                               durable=True, **detail)
        except Exception as exc:
            log.error("audit event not written yet", action=action, error=_store_detail(exc))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Checkpoint: stop at the next batch boundary; the state stays resumable."""
        self._closing.set()
        self._stop.shutdown.set()
        with self._changed:
            self._changed.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._save_failure()  # one last try; else the stored phase resumes after a restart

    # ------------------------------------------------------------------ worker

    def _spawn(self) -> None:
        self._stop = _Stop()
        self._thread = threading.Thread(target=self._run, name="rotation", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._drive()
        except _Interrupted:
            log.info("rotation checkpointed for shutdown")
        except Exception as exc:  # never leave a rotation silently half-done
            state = self._state
            kind, message = _describe_failure(exc, state.phase if state else "")
            if kind == FAILURE_STORE:
                log.error("rotation failed: the store refused an operation",
                          error=message, phase=state.phase if state else "")
            else:
                log.exception("rotation failed")
            if state is not None and not state.terminal:
                try:
                    self._fail(state, message, kind)
                except Exception:  # not even in memory: the orphan metric shows it
                    log.exception("rotation failure could not be recorded")

    def _drive(self) -> None:
        while True:
            state = self._state
            assert state is not None
            if state.terminal:
                return
            if (self._stop.abort.is_set() or state.abort_requested) \
                    and state.phase not in (ROLLBACK, FINALIZE):
                self._stop.abort.clear()
                self._enter_rollback(state, "abort requested")
                continue
            step = {
                PRECHECK: self._step_new_key,
                NEW_KEY: self._step_new_key,
                REENCRYPT: self._step_reencrypt,
                VALIDATE: self._step_validate,
                FINALIZE: self._step_finalize,
                ROLLBACK: self._step_rollback,
            }[state.phase]
            try:
                step(state)
            except _AbortRequested:
                self._stop.abort.clear()
                self._enter_rollback(self._state or state, "abort requested")

    # -- phases

    def _precheck(self, state: RotationState) -> None:
        self._keys.require_unsealed()
        try:
            self._store.check_writable()
        except Exception:
            raise NotReady(ErrorKind.STORE, "the store is not writable: rotation refused") from None
        if self._data_dir is not None:
            free = shutil.disk_usage(self._data_dir).free
            if free < MIN_FREE_BYTES:
                raise Conflict(f"only {free // (1024 * 1024)} MiB free in the data directory: "
                               "rotation refused")
        health = self._keys.verify_backup_file()
        if health.status != "ok":
            raise Conflict(f"the backup is {health.status} ({health.detail}): fix it before "
                           "rotating (`spike backup status`)")

    def _step_new_key(self, state: RotationState) -> None:
        testpoints.reached("rotation_precheck_done")
        keyring = self._keys.require_unsealed()
        newer = [g for g in keyring.generations if g > state.from_generation]
        if state.phase == NEW_KEY and newer:
            # A crash after the backup was updated: the new key came back with the backup.
            to = max(newer)
            self._keys.ensure_recorded()
        else:
            state = self._publish(replace(state, phase=NEW_KEY, message="generating new key"))
            info = self._keys.add_generation()
            to = info.generation
        self._keys.activate(to)
        total = sum(n for g, n in self._store.count_by_generation().items() if g != to)
        self._publish(replace(state, phase=REENCRYPT, to_generation=to, total=total,
                              cursor=None, message=f"re-encrypting under generation {to}"))
        self._audit.record("rotation.new_key", caller="(nexus)", target=state.rotation_id,
                           outcome="ok", durable=True, generation=to)
        testpoints.reached("rotation_new_key_done")

    def _step_reencrypt(self, state: RotationState) -> None:
        self._keys.activate(state.to_generation)
        # The scans select by the plaintext generation column: a cell that disagrees with
        # its ciphertext header (an edited database) is set right first (and logged).
        reconcile_generation_cells(self._store, self._keys.require_unsealed().generations)
        state = self._move_records(state, target=state.to_generation, forward=True)
        self._publish(replace(state, phase=VALIDATE, cursor=None, message="validating"))

    def _step_validate(self, state: RotationState) -> None:
        """One pass over every record: each must be under the new generation and decrypt
        with the new key. A record still under another generation sends the rotation back
        to re-encryption (a write that raced the key switch) or, if some records failed
        their integrity check, stops it with both keys kept."""
        testpoints.reached("rotation_validate")
        target = state.to_generation
        keyring = self._keys.require_unsealed()
        after: RecordKey | None = None
        checked = leftover = 0
        # Throttled like re-encryption (decrypting is about half the work, so twice the
        # rate): an unpaced pass over every record held the GIL long enough to push
        # foreground p99 to ~50 ms in the benchmark.
        pace_rate = 2 * state.max_rate
        batch = min(state.batch_size, VALIDATE_BATCH_SIZE)
        checkers: dict[str, envelope.Resealer] = {}
        while True:
            self._check_interrupt(allow_abort=True)
            rows = self._store.scan_not_in_generation(EVERY_GENERATION, after, batch)
            if not rows:
                break
            begun = time.monotonic()
            for index, (kind, path, version, generation, blob) in enumerate(rows):
                if pace_rate and index and index % 16 == 0:
                    ahead = index / pace_rate - (time.monotonic() - begun)
                    self._sleep(max(ahead, 0.0001))
                if generation != target:
                    leftover += 1
                    continue
                checker = checkers.get(kind)
                if checker is None:
                    checker = checkers[kind] = _resealer(keyring, kind, target)
                # Under the new key only, and the header must name it too: a row whose
                # column says the new generation but whose header says otherwise fails.
                if not checker.opens_under_target(path, version, blob):
                    self._fail(state, f"validation: {kind} {path} v{version} does "
                                      f"not decrypt under generation {target}; both keys kept",
                               FAILURE_VALIDATION)
                    return
            checked += len(rows)
            after = rows[-1].key
        if leftover:
            if state.failed:
                self._fail(state, f"{state.failed} record(s) failed their integrity check and "
                                  f"stay under generation {state.from_generation}: destroy or "
                                  "rewrite them, then `spike rotation resume`",
                           FAILURE_INTEGRITY)
                return
            # Writes that raced the switch: sweep again.
            self._publish(replace(state, phase=REENCRYPT, cursor=None,
                                  message=f"{leftover} record(s) left; sweeping again"))
            return
        self._publish(replace(state, phase=FINALIZE,
                              message=f"validated {checked} record(s) under generation {target}"))
        testpoints.reached("rotation_validated")

    def _step_finalize(self, state: RotationState) -> None:
        target = state.to_generation
        keyring = self._keys.require_unsealed()
        # Other nodes sharing the store notice the new generation within a second
        # (KeyManager.assert_current) and stop writing under the old one; wait out
        # that window, then count again before anything is dropped.
        info = self._keys.generations_recorded().get(target)
        if info is not None:
            grace = self._stale_node_grace
            wait = info.created + grace - self._clock()
            if wait > 0:
                self._sleep(min(wait, grace))
        counts = self._store.count_by_generation()
        leftover = sum(n for g, n in counts.items() if g != target)
        if leftover:
            self._publish(replace(state, phase=REENCRYPT, cursor=None,
                                  message=f"{leftover} record(s) written under an old key "
                                          "meanwhile; sweeping again"))
            return
        for generation in keyring.generations:
            if generation != target and not counts.get(generation):
                self._keys.drop_generation(generation)
        testpoints.reached("rotation_finalized")
        self._counter.flush()
        self._publish(replace(state, phase=COMPLETED, message=(
            f"generation {target} active; generation {state.from_generation} removed from "
            "memory and backup"), eta=0.0))
        self._record_quietly("rotation.completed", caller="(nexus)",
                             target=state.rotation_id, from_generation=state.from_generation,
                             to_generation=target, reencrypted=state.reencrypted,
                             skipped=state.skipped)

    def _enter_rollback(self, state: RotationState, message: str) -> None:
        total = self._store.count_by_generation().get(state.to_generation, 0) \
            if state.to_generation else 0
        self._publish(replace(state, phase=ROLLBACK, cursor=None, total=total, done=0,
                              reencrypted=0, skipped=0, failed=0, abort_requested=False,
                              failure_kind="", failed_in_phase="", failure_unsaved=False,
                              message=message))

    def _step_rollback(self, state: RotationState) -> None:
        keyring = self._keys.require_unsealed()
        back = state.from_generation
        # to_generation is 0 when the rotation stopped before recording it; a key that
        # add_generation already put in memory (and the backup) must still be dropped.
        source = state.to_generation or max(
            (g for g in keyring.generations if g > back), default=0)
        if source and source in keyring.generations:
            state = replace(state, to_generation=source)  # _move_records reads it
            self._keys.activate(back)
            state = self._move_records(state, target=back, forward=False)
            testpoints.reached("rotation_rolled_back")
            if self._store.count_by_generation().get(source, 0):
                self._fail(state, f"rollback left records under generation {source}; both "
                                  "keys kept: `spike rotation abort` again", FAILURE_ROLLBACK)
                return
            self._keys.drop_generation(source)
        testpoints.reached("rotation_abort_dropped")
        self._publish(replace(state, phase=ABORTED, cursor=None, eta=0.0,
                              message=f"aborted; generation {back} active"))
        self._record_quietly("rotation.aborted", caller="(nexus)", target=state.rotation_id)

    # -- the batch loop

    def _move_records(self, state: RotationState, *, target: int,
                      forward: bool) -> RotationState:
        """Re-encrypt every record not under ``target`` (forward) or under the new
        generation (rollback) until none is left; the cursor makes restarts cheap."""
        cursor = RecordKey(*state.cursor) if state.cursor else None
        failed_keys: set[RecordKey] = set()
        window: list[tuple[float, int]] = []
        source = state.to_generation
        # A pass walks the keyset from the cursor to the end. Writes that raced the key
        # switch may land behind the cursor, so we are done only after a pass *from the
        # start* found nothing to do (rows that failed to decrypt are skipped).
        pass_from_start = cursor is None
        pass_work = 0
        while True:
            self._check_interrupt(allow_abort=forward)
            started = time.monotonic()
            if forward:
                rows = self._store.scan_not_in_generation(target, cursor, state.batch_size)
            else:
                rows = self._store.scan_generation(source, cursor, state.batch_size)
            if not rows:
                # Forward, a whole pass with nothing failed is enough: validation walks
                # every record and sends the rotation back here if a raced write left one
                # behind. Otherwise make sure with a pass that finds nothing to do.
                if pass_from_start and (pass_work == 0 or (forward and not failed_keys)):
                    return state
                cursor, pass_from_start, pass_work = None, True, 0
                continue
            last_key = rows[-1].key
            if failed_keys:
                rows = [r for r in rows if r.key not in failed_keys]
                if not rows:
                    cursor = last_key
                    continue
            pass_work += len(rows)
            updates, bad = self._reseal_rows(rows, target, max_rate=state.max_rate)
            failed_keys.update(bad)
            cursor = last_key
            now = time.monotonic()
            window.append((now, len(rows)))
            window = [(t, n) for t, n in window if now - t <= 10.0]
            span = max(now - window[0][0], now - started, 1e-6)
            rate = sum(n for _, n in window) / span
            done = state.done + len(rows)
            remaining = max(state.total - done, 0)
            with self._lock:
                # The cursor is committed in the same transaction as the batch, so a
                # crash never re-does or skips a batch. The stored counts assume every
                # update applied; the exact ones are announced now and stored next time.
                planned = self._stamp_locked(replace(
                    state,
                    done=done,
                    reencrypted=state.reencrypted + len(updates),
                    failed=state.failed + len(bad),
                    total=max(state.total, done),
                    rate=rate,
                    eta=remaining / rate if rate > 0 else 0.0,
                    cursor=(cursor.kind, cursor.path, cursor.version),
                ))
                changed = self._store.replace_blobs(updates,
                                                    state=(STATE_KEY, planned.to_json()))
                state = self._announce_locked(replace(
                    planned,
                    reencrypted=state.reencrypted + changed,
                    skipped=state.skipped + (len(updates) - changed),
                ))
            if updates:
                self._counter.add(target, len(updates))
            testpoints.reached("rotation_batch_written")
            testpoints.reached("rotation_between_batches")
            self._throttle(state, len(rows), started)

    def _reseal_rows(self, rows: list[ScanRow], target: int,
                     max_rate: int = 0) -> tuple[list[BlobUpdate], list[RecordKey]]:
        """Decrypt each row under its own generation and encrypt it under ``target``.

        Throttled (``max_rate`` > 0), the work is paced in small slices with a sleep after
        each, so foreground requests get the GIL within a slice instead of waiting for the
        interpreter's switch interval behind a whole batch.
        """
        keyring = self._keys.require_unsealed()
        resealers: dict[str, envelope.Resealer] = {}
        updates: list[BlobUpdate] = []
        bad: list[RecordKey] = []
        pace_every = 16 if max_rate > 0 else 0
        begun = time.monotonic()
        add = updates.append
        for index, (kind, path, version, generation, blob) in enumerate(rows):
            if pace_every and index and index % pace_every == 0:
                ahead = index / max_rate - (time.monotonic() - begun)
                self._sleep(max(ahead, 0.0001))
            resealer = resealers.get(kind)
            if resealer is None:
                resealer = resealers[kind] = _resealer(keyring, kind, target)
            new_blob = resealer.reseal(path, version, blob)
            if new_blob is None:
                bad.append(RecordKey(kind, path, version))
                log.error("record failed its integrity check during rotation",
                          kind=kind, path=path, version=version)
                continue
            add(BlobUpdate(kind, path, version, generation, blob, target, new_blob))
        return updates, bad

    def _throttle(self, state: RotationState, count: int, started: float) -> None:
        if state.max_rate <= 0:
            return
        wanted = count / state.max_rate
        elapsed = time.monotonic() - started
        if wanted > elapsed:
            self._sleep(wanted - elapsed)

    def _check_interrupt(self, *, allow_abort: bool) -> None:
        if self._stop.shutdown.is_set():
            raise _Interrupted()
        if allow_abort and self._stop.abort.is_set():
            raise _AbortRequested()

    # -- publishing

    def _publish(self, state: RotationState) -> RotationState:
        with self._lock:
            return self._publish_locked(state)

    def _publish_locked(self, state: RotationState, *, claim: bool = False,
                        expected_raw: str | None = None) -> RotationState:
        """Persist and announce ``state``. ``claim``: only if the stored document is
        still ``expected_raw`` (compare-and-set), else Conflict."""
        state = self._stamp_locked(state)
        if not claim:
            self._store.put_state(STATE_KEY, state.to_json())
        elif not self._store.swap_state(STATE_KEY, expected_raw, state.to_json()):
            raise Conflict("another Nexus node started a rotation at the same moment: "
                           "`spike rotation status`")
        return self._announce_locked(state)

    def _stamp_locked(self, state: RotationState) -> RotationState:
        """The next sequence number and time; carries a pending abort request along."""
        previous = self._state
        sequence = max(state.sequence, previous.sequence if previous else 0) + 1
        state = replace(state, sequence=sequence, updated=self._clock())
        if self._stop.abort.is_set() and not state.terminal \
                and state.phase not in (ROLLBACK, FINALIZE):
            state = replace(state, abort_requested=True)  # the worker's copy predates it
        return state

    def _announce_locked(self, state: RotationState) -> RotationState:
        previous = self._state
        self._state = state
        if not state.failure_unsaved:
            self._unsaved = None  # a newer state reached the store
        self._changed.notify_all()
        for listener in self._listeners:
            try:
                listener(state)
            except Exception:
                log.exception("rotation listener failed")
        if state.phase != (previous.phase if previous else None):
            log.info("rotation phase", rotation_id=state.rotation_id, phase=state.phase,
                     from_generation=state.from_generation, to_generation=state.to_generation,
                     done=state.done, total=state.total)
        return state

    def _fail(self, state: RotationState, message: str, kind: str = FAILURE_INTERNAL) -> None:
        """Enter FAILED. Announced to watchers even when the store refuses to save it (the
        disk is full: the very failure may be why); it is then saved as soon as the store
        takes writes again, and until then stands in for the stored state here."""
        base = self._state or state
        failed = replace(base, phase=FAILED, message=message, eta=0.0, failure_kind=kind,
                         failed_in_phase=base.failed_in_phase if base.phase == FAILED
                         else base.phase, failure_unsaved=False)
        with self._lock:
            failed = self._stamp_locked(failed)
            try:
                self._store.put_state(STATE_KEY, failed.to_json())
            except Exception as exc:
                log.error("rotation failure not saved: the store refuses writes; retrying",
                          rotation_id=failed.rotation_id, error=_store_detail(exc))
                failed = replace(failed, failure_unsaved=True)
            self._announce_locked(failed)
            if failed.failure_unsaved:
                self._unsaved = failed
        if failed.failure_unsaved:
            self._start_saver()
        self._record_quietly("rotation.failed", caller="(nexus)", target=state.rotation_id,
                             outcome="failed", reason=message, kind=kind,
                             phase=failed.failed_in_phase)

    def _start_saver(self) -> None:
        saver = self._saver
        if saver is not None and saver.is_alive():
            return
        self._saver = threading.Thread(target=self._saver_loop, name="rotation-failure-saver",
                                       daemon=True)
        self._saver.start()

    def _saver_loop(self) -> None:
        delay = FAILURE_SAVE_FIRST_RETRY
        while not self._closing.wait(delay):
            if self._save_failure():
                return
            delay = min(delay * 2, FAILURE_SAVE_MAX_RETRY)

    def _save_failure(self) -> bool:
        """Try to save the unsaved FAILED state; True once nothing is left to save."""
        with self._lock:
            pending = self._unsaved
            if pending is None:
                return True
            try:
                raw = self._store.get_state(STATE_KEY)
                stored = RotationState.from_json(raw) if raw else None
                if stored is not None and (stored.rotation_id != pending.rotation_id
                                           or stored.sequence >= pending.sequence):
                    self._unsaved = None  # superseded (another node, an operator)
                    return True
                saved = replace(pending, failure_unsaved=False)
                if not self._store.swap_state(STATE_KEY, raw, saved.to_json()):
                    return False  # changed meanwhile: look again next time
            except Exception as exc:
                log.debug("rotation failure still not saved", error=_store_detail(exc))
                return False
            log.info("rotation failure saved", rotation_id=saved.rotation_id)
            if self._state is pending:
                self._announce_locked(saved)  # same sequence: watchers see no new event
            else:
                self._unsaved = None
            return True


def _store_detail(exc: BaseException) -> str:
    """A short description of a store or file error: the driver's and the kernel's words
    (the store holds ciphertext only, so no secret value can be in them), bounded."""
    parts = [type(exc).__name__]
    text = str(exc).splitlines()[0] if str(exc) else ""
    if text:
        parts.append(text[:200])
    cause = exc.__cause__ or exc.__context__
    name = getattr(cause, "sqlite_errorname", None) or getattr(exc, "sqlite_errorname", None)
    if name:
        parts.append(str(name))
    code = getattr(exc, "errno", None) or getattr(cause, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        parts.append(errno.errorcode[code])
    return ": ".join(parts[:2]) + (f" ({', '.join(parts[2:])})" if parts[2:] else "")


def _describe_failure(exc: BaseException, phase: str) -> tuple[str, str]:
    """(failure kind, message) for an exception that stopped the worker."""
    if isinstance(exc, StoreError | OSError):
        return FAILURE_STORE, (
            f"the store or the data directory refused an operation during "
            f"{phase or 'the rotation'} "
            f"({_store_detail(exc)}): progress up to the last batch is saved and both keys "
            "are kept; fix the cause (disk full? store down?), then `spike rotation resume`")
    return FAILURE_INTERNAL, (f"internal error ({type(exc).__name__}); keys are kept: check "
                              "the logs, then `spike rotation resume`")


@contextlib.contextmanager
def _store_errors(action: str) -> Iterator[None]:
    """An operator's command that the store cannot carry out now: UNAVAILABLE, not INTERNAL."""
    try:
        yield
    except (StoreError, OSError) as exc:
        raise Unavailable(f"cannot {action} now: the store or the data directory refused "
                          f"({_store_detail(exc)}); fix it and try again") from None


class _Interrupted(Exception):
    """Nexus is shutting down: stop at a batch boundary, state stays resumable."""


class _AbortRequested(Exception):
    """Raised inside the forward batch loop when an abort was requested."""


def state_summary(state: RotationState | None) -> dict[str, Any]:
    return asdict(state) if state else {"phase": IDLE}
