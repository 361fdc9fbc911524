"""Root key rotation: online re-encryption of every stored record, crash-safe.

Phases (``spike.states.RotationPhase``; docs/runbooks/rotation.md follows them for the
operator):

1. ``precheck``  unsealed, store writable, free space, backup present and matching,
                 no rotation running;
2. ``new_key``   RK(g+1) is generated and sealed into the backup *before* anything is
                 written under it; new writes use g+1 at once;
3. ``reencrypt`` batches of records not yet under g+1: decrypt, encrypt under g+1,
                 conditional write (a user write that landed meanwhile wins);
                 paced (``nexus.core.pacing``); the cursor is persisted after every batch;
4. ``validate``  nothing left outside g+1, every record decrypts under g+1: each new
                 ciphertext was opened under g+1 in memory before it was written
                 (``Resealer.reseal_checked``), and the store shows no record whose
                 generation or ciphertext header names another generation (two aggregate
                 scans in the store, no second pass of decryption; docs/benchmarks.md);
5. ``finalize``  g is dropped from the backup first, then wiped from memory.

``rollback`` (abort) moves records back under g and drops g+1. The job's state
lives in the store (state key ``rotation``) so that after a crash and
``spike recover`` the rotation resumes by itself. Progress is published as
events with a monotone sequence number; any number of watchers read them.

Two locks. ``_lock`` guards the published state and is held only for a few assignments:
``watch()`` and ``abort()`` take it and never wait behind a store write or a listener.
``_order`` orders publication: the next sequence number, the store write of the state and
the listeners happen under it, one state at a time, so that every watcher and listener sees
the states in sequence order, without a duplicate.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, assert_never

import structlog

from nexus.audit import AuditLog
from nexus.core import testpoints
from nexus.core.counter import EncryptionCounter
from nexus.core.errors import Conflict, InvalidInput, NotFound, NotReady, Unavailable
from nexus.core.integrity import reconcile_generation_cells
from nexus.core.keymanager import KeyManager
from nexus.core.pacing import Pacer, RateMeter
from nexus.core.testpoints import Point
from nexus.crypto import envelope
from nexus.crypto.keyring import Keyring
from nexus.crypto.keys import Purpose
from nexus.store.base import KIND_SECRET, BlobUpdate, RecordKey, ScanRow, Store, StoreError
from spike.errors import ErrorKind
from spike.states import BackupStatus, FailureKind, RotationPhase

log = structlog.get_logger("nexus.rotation")

STATE_KEY = "rotation"
# The id of a rotation an operator asked to abort, written by abort() on its own row before
# it answers: the request is durable even while a publication holds the state's row.
ABORT_KEY = "rotation_abort"

DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_RATE = 2_000  # records/s when throttled (tests/bench_rotation.py: get p99)
# Unthrottled rotations amortize each durable commit over more records.
EMERGENCY_BATCH_SIZE = 2000
MAX_BATCH_SIZE = 10_000
# Validation pages through the records whose generation cell and header disagree (none,
# normally) this many at a time.
MISMATCH_PAGE = 500
MIN_FREE_BYTES = 64 * 1024 * 1024
# Seconds between recording a new generation and dropping the old one when several
# nodes share the store (see finalize): twice KeyManager.assert_current's refresh.
STALE_NODE_GRACE = 2.0
# Finalize waits at most this long (the nodes' heartbeat lease) for every other live node to
# report the new generation, looking again every PEER_POLL seconds.
PEER_WAIT = 10.0
PEER_POLL = 0.2


class PeerReport(Protocol):
    """What finalize reads of another node's heartbeat (nexus.core.cluster.NodeRecord)."""

    @property
    def name(self) -> str: ...

    @property
    def generation(self) -> int: ...
# A FAILED phase the store refused to save (disk full, store down) is retried this often
# (doubling from the first) until it is saved or superseded.
FAILURE_SAVE_FIRST_RETRY = 0.5
FAILURE_SAVE_MAX_RETRY = 10.0
# States kept for watchers that fall behind: far more than are published between two wakes.
WATCH_HISTORY = 256

# The phases an abort request no longer applies to: a rollback is what it asks for, and
# finalize is past the point of no return.
_UNABORTABLE = frozenset({RotationPhase.ROLLBACK, RotationPhase.FINALIZE})


@dataclass(frozen=True)
class RotationState:
    """One rotation's progress: persisted after every step, published as events."""

    rotation_id: str
    phase: RotationPhase
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
    # FAILED only ("" otherwise): what kind of failure and the phase it stopped in.
    failure_kind: FailureKind | Literal[""] = ""
    failed_in_phase: RotationPhase | Literal[""] = ""
    # FAILED only: the store refused to save the failure; this process alone knows it
    # (and keeps trying to save it). Never true in the stored document.
    failure_unsaved: bool = False

    @property
    def terminal(self) -> bool:
        return self.phase.terminal

    @property
    def abortable(self) -> bool:
        """An abort request still applies (not ended, not rolling back or finalizing)."""
        return not self.terminal and self.phase not in _UNABORTABLE

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RotationState:
        doc = json.loads(text)
        if doc.get("cursor") is not None:
            doc["cursor"] = tuple(doc["cursor"])
        doc["phase"] = RotationPhase(doc["phase"])
        if doc.get("failure_kind"):
            doc["failure_kind"] = FailureKind(doc["failure_kind"])
        if doc.get("failed_in_phase"):
            doc["failed_in_phase"] = RotationPhase(doc["failed_in_phase"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})


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


@dataclass
class _Sweep:
    """The batch loop's walk over the keyset: a pass goes from the cursor to the end."""

    cursor: RecordKey | None
    from_start: bool
    work: int = 0  # records handled in this pass
    failed: set[RecordKey] = field(default_factory=set)  # failed their integrity check

    def take(self, rows: list[ScanRow]) -> list[ScanRow]:
        """The rows of a batch to re-encrypt (not those that failed before); the cursor
        moves past the batch."""
        self.cursor = rows[-1].key
        if self.failed:
            rows = [r for r in rows if r.key not in self.failed]
        self.work += len(rows)
        return rows

    def finished(self, *, forward: bool) -> bool:
        """At the end of a pass. Writes that raced the key switch may land behind the
        cursor, so it is done only after a pass *from the start*; forward, one with nothing
        failed is enough (validation walks every record and sends the rotation back here if
        a raced write was left behind), else one that found nothing to do."""
        return self.from_start and (self.work == 0 or (forward and not self.failed))

    def restart(self) -> None:
        self.cursor, self.from_start, self.work = None, True, 0


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
        peers: Callable[[], Sequence[PeerReport]] | None = None,
        peer_wait: float = PEER_WAIT,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._store = store
        self._node_name = node_name
        # Only a store shared by several nodes needs the wait before the old key goes.
        self._stale_node_grace = stale_node_grace
        # The other live nodes' reports (their heartbeats), and how long finalize waits for
        # all of them to write under the new generation before it goes on without one.
        self._peers = peers
        self._peer_wait = peer_wait
        self._peer_wait_since: float | None = None
        self._keys = keys
        self._counter = counter
        self._audit = audit
        self._data_dir = data_dir
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()  # the published state (see the module's doc)
        self._changed = threading.Condition(self._lock)
        self._order = threading.Lock()  # publication: sequence, store write, listeners
        # A FAILED state the store refused to save: it stands in for the stored (older,
        # non-terminal) one until it is saved or a newer state is.
        self._unsaved: RotationState | None = None
        self._state: RotationState | None = self._load()
        self._thread: threading.Thread | None = None
        self._stop = _Stop()
        self._listeners: list[Callable[[RotationState], None]] = []
        # The states announced last, for watchers that wake after several of them.
        self._history: deque[RotationState] = deque(maxlen=WATCH_HISTORY)
        self._saver: threading.Thread | None = None
        self._closing = threading.Event()
        # The finalize gate (under ``_lock``): aborts being recorded hold the worker before
        # it finalizes; once it finalizes (``_finalizing``) no abort is accepted.
        self._aborting = 0
        self._finalizing = False
        self._spawn_lock = threading.Lock()

    # ------------------------------------------------------------------ queries

    def _load(self) -> RotationState | None:
        raw = self._store.get_state(STATE_KEY)
        state = RotationState.from_json(raw) if raw else None
        if state is not None and state.abortable and not state.abort_requested \
                and self._store.get_state(ABORT_KEY) == state.rotation_id:
            state = replace(state, abort_requested=True)  # acknowledged, not yet carried
        return self._overlay(state)

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
        sharing the store may be the one rotating. (While a state is being published
        here, the one in memory is returned: it is about to be the newest.)
        """
        if self.running() or not self._order.acquire(blocking=False):
            return self._state
        try:
            stored = self._load()
            if not self.running():
                self._adopt(stored)
        except StoreError:
            pass  # the store is down: the last known state
        finally:
            self._release_order()
        return self._state

    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def in_worker(self) -> bool:
        """The calling thread is this engine's worker (for test hooks)."""
        return threading.current_thread() is self._thread

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end (it writes the audit after its terminal state);
        True when no worker runs."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running()

    def orphaned(self) -> bool:
        """A rotation of this node is neither terminal nor driven by a worker while Nexus
        is unsealed: nothing will move it on (the metric and alert for a dead worker)."""
        if self.running() or not self._keys.is_unsealed():
            return False
        state = self.current
        return state is not None and not state.terminal \
            and state.node in ("", self._node_name) and not self.running()

    def add_listener(self, listener: Callable[[RotationState], None]) -> None:
        """``listener(state)`` for every state published, in sequence order, in the
        publishing thread (never under the lock that watch() and abort() take)."""
        self._listeners.append(listener)

    def watch(self, timeout: float = 15.0) -> Iterator[RotationState]:
        """A snapshot first, then every state published after it, in sequence order, until
        a terminal one. A watcher that wakes after several publications gets each of them
        (up to WATCH_HISTORY states back), not only the newest.

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
                missed = [s for s in self._history if last < s.sequence < state.sequence]
            if state.sequence == last and not state.terminal:
                if not self.running() and self._stop.shutdown.is_set():
                    return  # Nexus is stopping: the watcher reconnects later
                yield state  # keep-alive
                continue
            for event in (*missed, state):
                yield event
                if event.terminal:
                    return
            last = state.sequence

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
        with self._ordered(), _store_errors("start a rotation"):
            # The store decides, not this process's memory: several nodes may share it.
            stored_raw = self._store.get_state(STATE_KEY)
            previous = self._overlay(RotationState.from_json(stored_raw) if stored_raw
                                     else None)
            self._adopt(previous)
            self._refuse_start(previous)
            keyring = self._keys.require_unsealed()
            active = keyring.active_generation
            assert active is not None
            now = self._clock()
            state = RotationState(
                rotation_id=uuid.uuid4().hex[:12],
                phase=RotationPhase.PRECHECK,
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
            self._publish_ordered(state, claim=True, expected_raw=stored_raw)
        # The job is claimed: a worker must drive it even if the audit cannot be written
        # now (a full disk: the line stays queued in the audit log; the worker will fail
        # visibly on its first write).
        self._record_quietly("rotation.start", caller=caller, target=state.rotation_id,
                             from_generation=active, emergency=emergency, reason=reason)
        self._spawn()
        return state

    def _refuse_start(self, previous: RotationState | None) -> None:
        if self.running() or (previous is not None and not previous.terminal):
            where = f" on node {previous.node}" if previous and previous.node and \
                previous.node != self._node_name else ""
            raise Conflict(f"a rotation is already running{where}: watch it with "
                           "`spike rotation watch` or stop it with `spike rotation abort`")
        if previous is not None and previous.phase == RotationPhase.FAILED:
            raise Conflict("the last rotation failed: fix its cause, then "
                           "`spike rotation resume` or `spike rotation abort`")

    def abort(self, caller: str, reason: str = "") -> RotationState:
        self.current  # noqa: B018 - refresh from the store when no worker runs here
        with self._lock:
            state = self._state
            if state is None or (state.terminal and state.phase != RotationPhase.FAILED):
                raise NotFound("no rotation to abort")
            if state.node and state.node != self._node_name and not state.terminal:
                raise Conflict(f"the rotation runs on node {state.node}: abort it there; if "
                               "that node is gone for good, `spike rotation resume` here first")
            if state.phase == RotationPhase.FINALIZE or self._finalizing:
                raise Conflict("the rotation is finalizing and can no longer be aborted")
            self._aborting += 1  # the worker does not finalize until this abort is decided
        try:
            self._record_abort(state, caller, reason)
        finally:
            with self._changed:
                self._aborting -= 1
                self._changed.notify_all()
        return state

    def _record_abort(self, state: RotationState, caller: str, reason: str) -> None:
        with _store_errors("abort the rotation"):  # audited before anything is done
            self._audit.record("rotation.abort", caller=caller, target=state.rotation_id,
                               outcome="ok", durable=True, reason=reason)
        if self.running():
            # Durable before it is acknowledged (a crash before the worker sees it must not
            # lose it), on its own row: never behind the publication under way.
            with _store_errors("abort the rotation"):
                self._store.put_state(ABORT_KEY, state.rotation_id)
            self._stop.abort.set()
            # The state itself carries it now, or after the publication under way.
            self._save_abort_request()
        else:
            with _store_errors("abort the rotation"):
                self._enter_rollback(state, f"abort requested by {caller}")
            self._spawn()

    def resume(self, caller: str) -> RotationState:
        self.current  # noqa: B018 - refresh from the store when no worker runs here
        with self._ordered(), _store_errors("resume the rotation"):
            state = self._state
            if state is None or state.phase in (RotationPhase.COMPLETED, RotationPhase.ABORTED):
                raise NotFound("no interrupted or failed rotation to resume")
            if self.running():
                raise Conflict("the rotation is already running")
            if state.phase == RotationPhase.FAILED:
                self._store.delete_state(ABORT_KEY)  # resuming overrules an earlier abort
                self._publish_ordered(_resumed(state, caller, self._node_name))
            elif state.node != self._node_name:  # an operator moves the job here
                self._publish_ordered(replace(state, node=self._node_name,
                                              message=f"taken over by {caller}"))
        self._record_quietly("rotation.resume", caller=caller, target=state.rotation_id)
        self._spawn()
        assert self._state is not None
        return self._state

    def resume_after_unseal(self) -> bool:
        """Called when Nexus unseals: continue an interrupted rotation by itself —
        only one this node started; another node's job is that node's (or an
        operator's explicit `spike rotation resume`)."""
        with self._ordered():
            state = self._load()
            self._adopt(state)
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

    def request_shutdown(self) -> None:
        """Ask the worker to stop at its next batch boundary (the state stays resumable)
        and end the watch streams; returns at once. ``shutdown`` also waits."""
        self._closing.set()
        self._stop.shutdown.set()
        with self._changed:
            self._changed.notify_all()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Checkpoint: stop at the next batch boundary; the state stays resumable."""
        self.request_shutdown()
        self.join(timeout)
        self._save_failure()  # one last try; else the stored phase resumes after a restart

    # ------------------------------------------------------------------ worker

    def _spawn(self) -> None:
        """Start the worker, unless one runs already (an abort and a resume racing on a
        failed rotation both ask for one: it drives whichever state was published last)."""
        with self._spawn_lock:
            if self.running():
                return
            with self._lock:
                self._finalizing = False
            self._stop = _Stop()
            self._thread = threading.Thread(target=self._run, name="rotation", daemon=True)
            self._thread.start()

    def _pass_finalize_gate(self) -> None:
        """Between a passed validation and FINALIZE: wait for an abort being recorded, then
        either roll back (an abort came first) or finalize (no abort is accepted after)."""
        testpoints.reached(Point.ROTATION_FINALIZE_GATE)
        with self._changed:
            while self._aborting:
                self._changed.wait()
            if self._stop.abort.is_set():
                raise _AbortRequested()
            self._finalizing = True

    def _run(self) -> None:
        try:
            self._drive_and_report()
        finally:
            with self._lock:
                self._finalizing = False  # a failed finalize can be aborted again

    def _drive_and_report(self) -> None:
        try:
            self._drive()
        except _Interrupted:
            log.info("rotation checkpointed for shutdown")
        except _SealCheckFailed as exc:
            state = self._state
            log.error("rotation stopped: a new ciphertext does not open under the new key")
            if state is not None and not state.terminal:
                self._fail(state, str(exc), FailureKind.VALIDATION)
        except Exception as exc:  # never leave a rotation silently half-done
            state = self._state
            kind, message = _describe_failure(exc, state.phase if state else "")
            if kind == FailureKind.STORE:
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
            step = self._step_for(state.phase)
            if step is None:
                return
            if (self._stop.abort.is_set() or state.abort_requested) and state.abortable:
                self._stop.abort.clear()
                self._enter_rollback(state, "abort requested")
                continue
            try:
                step(state)
            except _AbortRequested:
                self._stop.abort.clear()
                self._enter_rollback(self._state or state, "abort requested")

    def _step_for(self, phase: RotationPhase) -> Callable[[RotationState], None] | None:
        """The step that moves a rotation on from ``phase``; None once it has ended."""
        match phase:
            case RotationPhase.PRECHECK | RotationPhase.NEW_KEY:
                return self._step_new_key
            case RotationPhase.REENCRYPT:
                return self._step_reencrypt
            case RotationPhase.VALIDATE:
                return self._step_validate
            case RotationPhase.FINALIZE:
                return self._step_finalize
            case RotationPhase.ROLLBACK:
                return self._step_rollback
            case RotationPhase.COMPLETED | RotationPhase.FAILED | RotationPhase.ABORTED:
                return None
            case RotationPhase.IDLE:  # the word for "no rotation", never a rotation's phase
                raise RuntimeError("a rotation state in phase idle")
            case _:
                assert_never(phase)

    # -- phases

    def _precheck(self, state: RotationState) -> None:
        """Refusals are failed preconditions: the operator fixes the cause and retries."""
        self._keys.require_unsealed()
        try:
            self._store.check_writable()
        except Exception:
            raise NotReady(ErrorKind.STORE, "the store is not writable: rotation refused") \
                from None
        if self._data_dir is not None:
            free = shutil.disk_usage(self._data_dir).free
            if free < MIN_FREE_BYTES:
                raise NotReady(ErrorKind.STORE, f"only {free // (1024 * 1024)} MiB free in "
                               "the data directory: rotation refused")
        health = self._keys.verify_backup_file()
        if health.status != BackupStatus.OK:
            raise NotReady(ErrorKind.BACKUP_INVALID,
                           f"the backup is {health.status} ({health.detail}): fix it before "
                           "rotating (`spike backup status`)")

    def _step_new_key(self, state: RotationState) -> None:
        testpoints.reached(Point.ROTATION_PRECHECK_DONE)
        keyring = self._keys.require_unsealed()
        newer = [g for g in keyring.generations if g > state.from_generation]
        if state.phase == RotationPhase.NEW_KEY and newer:
            # A crash after the backup was updated: the new key came back with the backup.
            to = max(newer)
            self._keys.ensure_recorded()
        else:
            state = self._publish(replace(state, phase=RotationPhase.NEW_KEY,
                                          message="generating new key"))
            info = self._keys.add_generation()
            to = info.generation
        self._keys.activate(to)
        total = sum(n for g, n in self._store.count_by_generation().items() if g != to)
        self._publish(replace(state, phase=RotationPhase.REENCRYPT, to_generation=to,
                              total=total, cursor=None,
                              message=f"re-encrypting under generation {to}"))
        self._audit.record("rotation.new_key", caller="(nexus)", target=state.rotation_id,
                           outcome="ok", durable=True, generation=to)
        testpoints.reached(Point.ROTATION_NEW_KEY_DONE)

    def _step_reencrypt(self, state: RotationState) -> None:
        self._keys.activate(state.to_generation)
        # The scans select by the plaintext generation column: a cell that disagrees with
        # its ciphertext header (an edited database) is set right first (and logged).
        reconcile_generation_cells(self._store, self._keys.require_unsealed().generations)
        state = self._move_records(state, target=state.to_generation, forward=True)
        # Validation counts its own records (every one in the store) and says so when done.
        self._publish(replace(state, phase=RotationPhase.VALIDATE, cursor=None, done=0,
                              total=state.total, message="validating"))

    def _step_validate(self, state: RotationState) -> None:
        """Every record must be under the new generation and decrypt with the new key.

        Each ciphertext the re-encryption wrote was opened under the new key in memory
        before it was written (``_reseal_rows``); every other record under the new
        generation was sealed by it (a write under the active key, or a batch of this
        rotation before a restart, checked the same way then). What is left to prove is in
        the store: no record whose generation cell names another generation (one count),
        none whose cell says the new one while its authenticated header names another or is
        malformed (one scan for cell/header disagreements). A record still under another
        generation sends the rotation back to re-encryption (a write that raced the key
        switch) or, if some records failed their integrity check, stops it with both keys
        kept; a record that claims the new generation without its header stops it too."""
        testpoints.reached(Point.ROTATION_VALIDATE)
        self._check_interrupt(allow_abort=True)
        target = state.to_generation
        started = time.monotonic()
        counts = self._store.count_by_generation()
        checked = sum(counts.values())
        leftover = checked - counts.get(target, 0)
        unreadable = self._claims_target_wrongly(target)
        elapsed = max(time.monotonic() - started, 1e-6)
        self._announce_progress(replace(
            state, done=checked, total=checked, rate=checked / elapsed, eta=0.0,
            message=f"validated {checked} of {checked} record(s)"))
        state = _reencryption_counts(state)
        if unreadable:
            self._fail(state, unreadable, FailureKind.VALIDATION)
            return
        if leftover:
            if state.failed:
                self._fail(state, f"{state.failed} record(s) failed their integrity check and "
                                  f"stay under generation {state.from_generation}: destroy or "
                                  "rewrite them, then `spike rotation resume`",
                           FailureKind.INTEGRITY)
                return
            # Writes that raced the switch: sweep again.
            self._publish(replace(state, phase=RotationPhase.REENCRYPT, cursor=None,
                                  message=f"{leftover} record(s) left; sweeping again"))
            return
        self._pass_finalize_gate()
        self._publish(replace(state, phase=RotationPhase.FINALIZE,
                              message=f"validated {checked} record(s) under generation {target}"))
        testpoints.reached(Point.ROTATION_VALIDATED)

    def _claims_target_wrongly(self, target: int) -> str:
        """What does not decrypt under generation ``target`` although its cell names it
        (its header names another generation, or is not valid), or "": such a record is
        skipped by re-encryption and only an older key may open it."""
        after: RecordKey | None = None
        while True:
            rows = self._store.generation_mismatches(after, MISMATCH_PAGE)
            if not rows:
                return ""
            for row in rows:
                if row.cell == target:
                    return (f"validation: {row.kind} {row.path} v{row.version} does not "
                            f"decrypt under generation {target}; both keys kept")
            after = rows[-1].key
            self._check_interrupt(allow_abort=True)

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
        if not self._peers_hold(target):
            return  # the worker comes back to finalize (after a short pause)
        counts = self._store.count_by_generation()
        leftover = sum(n for g, n in counts.items() if g != target)
        if leftover:
            self._publish(replace(state, phase=RotationPhase.REENCRYPT, cursor=None,
                                  message=f"{leftover} record(s) written under an old key "
                                          "meanwhile; sweeping again"))
            return
        for generation in keyring.generations:
            if generation != target and not counts.get(generation):
                self._keys.drop_generation(generation)
        testpoints.reached(Point.ROTATION_FINALIZED)
        self._counter.flush()
        self._publish(replace(state, phase=RotationPhase.COMPLETED, message=(
            f"generation {target} active; generation {state.from_generation} removed from "
            "memory and backup"), eta=0.0))
        self._record_quietly("rotation.completed", caller="(nexus)",
                             target=state.rotation_id, from_generation=state.from_generation,
                             to_generation=target, reencrypted=state.reencrypted,
                             skipped=state.skipped)

    def _peers_hold(self, target: int) -> bool:
        """True once every other live node reports ``target`` as the generation it writes
        under (its heartbeat), or ``peer_wait`` seconds after the first look: a node that
        lags past that is swept by the recount that follows and refused by its own stale
        check, as without heartbeats. False: wait a moment and look again."""
        if self._peers is None:
            return True
        lagging = sorted(p.name for p in self._peers() if p.generation != target)
        now = self._clock()
        if not lagging:
            self._peer_wait_since = None
            return True
        if self._peer_wait_since is None:
            self._peer_wait_since = now
            log.info("waiting for the other nodes to write under the new generation",
                     generation=target, nodes=lagging)
        if now - self._peer_wait_since >= self._peer_wait:
            log.warning("finalizing while nodes still report an older generation",
                        generation=target, nodes=lagging)
            self._peer_wait_since = None
            return True
        self._check_interrupt(allow_abort=False)
        self._sleep(PEER_POLL)
        return False

    def _enter_rollback(self, state: RotationState, message: str) -> None:
        total = self._store.count_by_generation().get(state.to_generation, 0) \
            if state.to_generation else 0
        self._publish(replace(state, phase=RotationPhase.ROLLBACK, cursor=None, total=total,
                              done=0, reencrypted=0, skipped=0, failed=0,
                              abort_requested=False, failure_kind="", failed_in_phase="",
                              failure_unsaved=False, message=message))

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
            testpoints.reached(Point.ROTATION_ROLLED_BACK)
            if self._store.count_by_generation().get(source, 0):
                self._fail(state, f"rollback left records under generation {source}; both "
                                  "keys kept: `spike rotation abort` again",
                           FailureKind.ROLLBACK)
                return
            self._keys.drop_generation(source)
        testpoints.reached(Point.ROTATION_ABORT_DROPPED)
        self._publish(replace(state, phase=RotationPhase.ABORTED, cursor=None, eta=0.0,
                              message=f"aborted; generation {back} active"))
        self._record_quietly("rotation.aborted", caller="(nexus)", target=state.rotation_id)

    # -- the batch loop

    def _move_records(self, state: RotationState, *, target: int,
                      forward: bool) -> RotationState:
        """Re-encrypt every record not under ``target`` (forward) or under the new
        generation (rollback) until none is left; the cursor makes restarts cheap."""
        sweep = _Sweep(RecordKey(*state.cursor) if state.cursor else None,
                       from_start=state.cursor is None)
        pacer = Pacer(state.max_rate, self._sleep)
        meter = RateMeter()
        while True:
            self._check_interrupt(allow_abort=forward)
            started = time.monotonic()
            if forward:
                rows = self._store.scan_not_in_generation(target, sweep.cursor,
                                                          state.batch_size)
            else:
                rows = self._store.scan_generation(state.to_generation, sweep.cursor,
                                                   state.batch_size)
            if not rows:
                if sweep.finished(forward=forward):
                    return state
                sweep.restart()
                continue
            rows = sweep.take(rows)
            if not rows:
                continue
            updates, bad = self._reseal_rows(rows, target, pacer)
            sweep.failed.update(bad)
            # Before the rate is measured: the batch's time includes its pause, so even the
            # first event's rate stays within --max-rate.
            pacer.rest(len(rows), started)
            assert sweep.cursor is not None
            state = self._commit_batch(state, updates, bad, done=len(rows),
                                       cursor=sweep.cursor,
                                       rate=meter.observe(len(rows), started))
            if updates:
                self._counter.add(target, len(updates))
            testpoints.reached(Point.ROTATION_BETWEEN_BATCHES)

    def _commit_batch(self, state: RotationState, updates: list[BlobUpdate],
                      bad: list[RecordKey], *, done: int, cursor: RecordKey,
                      rate: float) -> RotationState:
        """Write a batch and the progress after it in one transaction, so a crash never
        re-does or skips a batch, and announce that progress."""
        done += state.done
        remaining = max(state.total - done, 0)
        with self._ordered():
            # The stored counts assume every update applied; the exact ones are announced
            # now and stored next time.
            planned = self._stamp(replace(
                state,
                done=done,
                reencrypted=state.reencrypted + len(updates),
                failed=state.failed + len(bad),
                total=max(state.total, done),
                rate=rate,
                eta=remaining / rate if rate > 0 else 0.0,
                cursor=(cursor.kind, cursor.path, cursor.version),
            ))
            changed = self._store.replace_blobs(updates, state=(STATE_KEY, planned.to_json()))
            return self._announce(replace(
                planned,
                reencrypted=state.reencrypted + changed,
                skipped=state.skipped + (len(updates) - changed),
            ))

    def _reseal_rows(self, rows: list[ScanRow], target: int,
                     pacer: Pacer) -> tuple[list[BlobUpdate], list[RecordKey]]:
        """Decrypt each row under its own generation and encrypt it under ``target``,
        paced by ``pacer``."""
        keyring = self._keys.require_unsealed()
        resealers: dict[str, envelope.Resealer] = {}
        updates: list[BlobUpdate] = []
        bad: list[RecordKey] = []
        add = updates.append
        for kind, path, version, generation, blob in pacer.paced(rows):
            resealer = resealers.get(kind)
            if resealer is None:
                resealer = resealers[kind] = _resealer(keyring, kind, target)
            try:
                new_blob = resealer.reseal_checked(path, version, blob)
            except envelope.SealCheckFailed:
                raise _SealCheckFailed(
                    f"validation: the new ciphertext of {kind} {path} v{version} does not "
                    f"decrypt under generation {target}; nothing written with it, both keys "
                    "kept") from None
            if new_blob is None:
                bad.append(RecordKey(kind, path, version))
                log.error("record failed its integrity check during rotation",
                          kind=kind, path=path, version=version)
                continue
            add(BlobUpdate(kind, path, version, generation, blob, target, new_blob))
        return updates, bad

    def _check_interrupt(self, *, allow_abort: bool) -> None:
        if self._stop.shutdown.is_set():
            raise _Interrupted()
        if allow_abort and self._stop.abort.is_set():
            raise _AbortRequested()

    # -- publishing

    @contextlib.contextmanager
    def _ordered(self) -> Iterator[None]:
        """Hold the publication order (see the module's doc). On leaving, an abort
        requested meanwhile is saved (``_save_abort_request``)."""
        self._order.acquire()
        try:
            yield
        finally:
            self._release_order()

    def _release_order(self) -> None:
        self._order.release()
        self._save_abort_request()

    def _adopt(self, state: RotationState | None) -> None:
        """Take ``state`` as the one in memory without announcing it (caller holds the
        publication order)."""
        with self._lock:
            self._state = state

    def _publish(self, state: RotationState) -> RotationState:
        with self._ordered():
            return self._publish_ordered(state)

    def _announce_progress(self, state: RotationState) -> RotationState:
        """Announce ``state`` to watchers without storing it: validation's progress, which
        a restart recomputes anyway (the stored state stays the one the phase began with)."""
        with self._ordered():
            return self._announce(self._stamp(state))

    def _publish_ordered(self, state: RotationState, *, claim: bool = False,
                         expected_raw: str | None = None) -> RotationState:
        """Persist and announce ``state`` (caller holds the publication order). ``claim``:
        only if the stored document is still ``expected_raw`` (compare-and-set), else
        Conflict."""
        state = self._stamp(state)
        if not claim:
            self._store.put_state(STATE_KEY, state.to_json())
        elif not self._store.swap_state(STATE_KEY, expected_raw, state.to_json()):
            raise Conflict("another Nexus node started a rotation at the same moment: "
                           "`spike rotation status`")
        return self._announce(state)

    def _stamp(self, state: RotationState) -> RotationState:
        """The next sequence number and time; carries a pending abort request along
        (caller holds the publication order)."""
        previous = self._state
        sequence = max(state.sequence, previous.sequence if previous else 0) + 1
        state = replace(state, sequence=sequence, updated=self._clock())
        if self._stop.abort.is_set() and state.abortable:
            state = replace(state, abort_requested=True)  # the worker's copy predates it
        return state

    def _announce(self, state: RotationState) -> RotationState:
        """Make ``state`` the current one, wake the watchers, then call the listeners
        (caller holds the publication order, not the state lock)."""
        with self._lock:
            previous = self._state
            self._state = state
            self._history.append(state)
            # Only a FAILED state the store refused stands in for the stored one; any
            # other state announced reached the store.
            self._unsaved = state if state.failure_unsaved else None
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

    def _save_abort_request(self) -> None:
        """Persist an abort request the current state does not carry yet. Never waits:
        when a publication is under way its thread does it on leaving (``_ordered``), so
        the request is saved right after the store write it arrived during."""
        while self._abort_unsaved() and self._order.acquire(blocking=False):
            try:
                current = self._state
                if current is not None and self._abort_unsaved():
                    self._publish_ordered(replace(current, abort_requested=True))
            except StoreError as exc:  # the worker still sees the request
                log.warning("abort request not saved; the worker rolls back anyway",
                            error=_store_detail(exc))
                return
            finally:
                self._order.release()

    def _abort_unsaved(self) -> bool:
        state = self._state
        return self._stop.abort.is_set() and state is not None and state.abortable \
            and not state.abort_requested

    def _fail(self, state: RotationState, message: str,
              kind: FailureKind = FailureKind.INTERNAL) -> None:
        """Enter FAILED. Announced to watchers even when the store refuses to save it (the
        disk is full: the very failure may be why); it is then saved as soon as the store
        takes writes again, and until then stands in for the stored state here."""
        with self._ordered():
            base = self._state or state
            failed = self._stamp(replace(
                base, phase=RotationPhase.FAILED, message=message, eta=0.0, failure_kind=kind,
                failed_in_phase=base.failed_in_phase if base.phase == RotationPhase.FAILED
                else base.phase, failure_unsaved=False))
            try:
                self._store.put_state(STATE_KEY, failed.to_json())
            except Exception as exc:
                log.error("rotation failure not saved: the store refuses writes; retrying",
                          rotation_id=failed.rotation_id, error=_store_detail(exc))
                failed = replace(failed, failure_unsaved=True)
            self._announce(failed)
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
        with self._ordered():
            pending = self._unsaved
            if pending is None:
                return True
            try:
                raw = self._store.get_state(STATE_KEY)
                stored = RotationState.from_json(raw) if raw else None
                if stored is not None and (stored.rotation_id != pending.rotation_id
                                           or stored.sequence >= pending.sequence):
                    self._drop_unsaved()  # superseded (another node, an operator)
                    return True
                saved = replace(pending, failure_unsaved=False)
                if not self._store.swap_state(STATE_KEY, raw, saved.to_json()):
                    return False  # changed meanwhile: look again next time
            except Exception as exc:
                log.debug("rotation failure still not saved", error=_store_detail(exc))
                return False
            log.info("rotation failure saved", rotation_id=saved.rotation_id)
            if self._state is pending:
                self._announce(saved)  # same sequence: watchers see no new event
            else:
                self._drop_unsaved()
            return True

    def _drop_unsaved(self) -> None:
        with self._lock:
            self._unsaved = None


def _resumed(state: RotationState, caller: str, node: str) -> RotationState:
    """A FAILED rotation, sent back to work by ``caller`` on ``node``."""
    if state.failed_in_phase == RotationPhase.ROLLBACK:
        phase = RotationPhase.ROLLBACK  # an abort that failed goes on rolling back
    else:
        # A failure before the new key was in place (to_generation still 0) resumes at
        # the new-key step, which picks up a key already added.
        phase = RotationPhase.REENCRYPT if state.to_generation else RotationPhase.NEW_KEY
    # After a store failure the saved cursor is good: continue from it. Records that
    # failed their integrity check are tried again from the start.
    keep_cursor = state.failure_kind == FailureKind.STORE \
        and phase == RotationPhase.REENCRYPT \
        and state.failed_in_phase == RotationPhase.REENCRYPT and not state.failed
    return replace(state, phase=phase, cursor=state.cursor if keep_cursor else None,
                   failed=0, abort_requested=False, node=node, failure_kind="",
                   failed_in_phase="", failure_unsaved=False, message=f"resumed by {caller}")


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


def _describe_failure(exc: BaseException, phase: str) -> tuple[FailureKind, str]:
    """(failure kind, message) for an exception that stopped the worker."""
    if isinstance(exc, StoreError | OSError):
        return FailureKind.STORE, (
            f"the store or the data directory refused an operation during "
            f"{phase or 'the rotation'} "
            f"({_store_detail(exc)}): progress up to the last batch is saved and both keys "
            "are kept; fix the cause (disk full? store down?), then `spike rotation resume`")
    return FailureKind.INTERNAL, (f"internal error ({type(exc).__name__}); keys are kept: "
                                  "check the logs, then `spike rotation resume`")


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


class _SealCheckFailed(Exception):
    """A ciphertext just made does not open under its key: the rotation stops (FAILED,
    validation) before the batch is written."""


def _reencryption_counts(state: RotationState) -> RotationState:
    """``state`` with done/total back to re-encryption's (validation counted its own in
    them): every record a batch handled was re-encrypted, skipped or failed."""
    done = state.reencrypted + state.skipped + state.failed
    return replace(state, done=done, total=done)
