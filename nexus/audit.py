"""The audit trail: append-only JSON lines, hash-chained (see spike.audit_chain).

One event per security-relevant action: who (caller SPIFFE ID), what
(action, target), and the outcome. Never a value, a password or a key.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from spike.audit_chain import GENESIS, last_hash, sealed_line

_log = structlog.get_logger("nexus.audit")


ANCHOR_EVERY = 100
MAX_FIELD_CHARS = 256
MAX_LIST_ITEMS = 16


def _bounded(text: str) -> str:
    if len(text) <= MAX_FIELD_CHARS:
        return text
    return f"{text[:MAX_FIELD_CHARS]}...({len(text)} chars)"


def _bounded_value(value: Any) -> Any:
    if isinstance(value, str):
        return _bounded(value)
    if isinstance(value, list | tuple) and len(value) > MAX_LIST_ITEMS:
        return [*value[:MAX_LIST_ITEMS], f"...({len(value)} items)"]
    return value


class AuditLog:
    """Appends sealed events to the trail.

    Each event is sealed (chained) under a short lock that covers no system call, then
    written with ``write(2)`` on an ``O_APPEND`` descriptor — no user-space buffer to lose
    in a crash, no flush per event. One thread writes at a time: a thread that finds a
    write in progress leaves its line to that writer, which writes every pending line, in
    chain order, before it returns. Without this, threads queued on the lock while the
    holder sat in ``write(2)`` with the GIL released: about two extra context switches per
    secret get under concurrent reads (docs/benchmarks.md). So a routine event is in
    the kernel either when ``record`` returns or, if another thread was writing, a few
    microseconds later; a durable event returns only once it is written and fsynced.
    A failed write raises in the thread that attempted it, keeps the unwritten lines
    for the next attempt, and every later ``record`` retries them first.
    """

    def __init__(self, target: str) -> None:
        self._lock = threading.Lock()
        self._written_cond = threading.Condition(self._lock)
        self._fsync = True
        self._fd: int
        if target == "-":
            self._fd = sys.stderr.fileno()
            self._prev = GENESIS
            self._fsync = False
            self._owned = False
        else:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._prev = last_hash(path.read_text().splitlines()) if path.exists() else GENESIS
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._owned = True
        self._seq = 0
        self._pending: list[bytes] = []
        self._writing = False
        self._written = 0  # highest seq handed to the kernel
        self._waiters = 0  # threads waiting on _written_cond (durable records, close)

    def record(
        self,
        action: str,
        *,
        caller: str,
        outcome: str,
        target: str = "",
        durable: bool = False,
        **detail: Any,
    ) -> None:
        """Append one event. ``durable`` waits for the write and fsyncs (lifecycle events).

        Request-derived fields are bounded (audited before validation, a caller could
        otherwise grow the trail by megabytes per call).
        """
        if len(target) > MAX_FIELD_CHARS:
            target = _bounded(target)
        if detail:
            detail = {k: _bounded_value(v) for k, v in detail.items()}
        with self._lock:
            self._seq += 1
            seq = self._seq
            event: dict[str, Any] = {
                "ts": round(time.time(), 6),
                "action": action,
                "caller": caller,
                "target": target,
                "outcome": outcome,
            }
            if detail:
                event["detail"] = detail
            line, chain = sealed_line(self._prev, event)
            self._prev = chain
            self._pending.append(line)
            # No writer at work: this thread becomes it, and takes the lines now rather
            # than under a second round of the lock.
            batch = None if self._writing else self._take()
        if batch is not None:
            self._drain(batch)
        if durable:
            with self._written_cond:
                while self._written < seq:
                    if not self._writing:  # the writer failed: retry it ourselves
                        self._writing = True
                        self._written_cond.release()
                        try:
                            self._drain()
                        finally:
                            self._written_cond.acquire()
                    else:
                        self._waiters += 1
                        try:
                            self._written_cond.wait()
                        finally:
                            self._waiters -= 1
            if self._fsync:
                os.fsync(self._fd)
        # The operational log repeats the chain hash as an independent anchor that reveals
        # a truncated audit file (the chain alone cannot): for every lifecycle event and
        # refusal, and every ANCHOR_EVERY-th routine one (not each read: that doubled the
        # cost of a secret get).
        if durable or outcome != "ok" or seq % ANCHOR_EVERY == 0:
            _log.info("audit", action=action, caller=caller, target=target, outcome=outcome,
                      seq=seq, chain=chain[:16])

    def _take(self) -> tuple[memoryview, int]:
        """Under the lock: claim the writer's role and every pending line (in chain order),
        with the sequence number of the last one."""
        self._writing = True
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        return data, self._seq

    def _drain(self, batch: tuple[memoryview, int] | None = None) -> None:
        """Write ``batch`` (taken by :meth:`_take`), then pending lines until none is left;
        only the thread that holds the writer's role."""
        rest = memoryview(b"")
        upto = 0
        try:
            while True:
                if batch is not None:
                    rest, upto = batch
                    batch = None
                else:
                    with self._lock:
                        if upto:
                            self._written = upto
                        if not self._pending:
                            self._writing = False
                        if self._waiters:
                            self._written_cond.notify_all()
                        if not self._writing:
                            return
                        rest, upto = self._take()
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except BaseException:
            with self._written_cond:
                if rest:
                    # What the kernel did not take (maybe the tail of a line): first in
                    # line for the next attempt, so the file never holds a torn line.
                    self._pending.insert(0, bytes(rest))
                self._writing = False
                self._written_cond.notify_all()
            raise

    def close(self) -> None:
        with self._written_cond:
            while self._writing:
                self._waiters += 1
                try:
                    self._written_cond.wait()
                finally:
                    self._waiters -= 1
            pending = b"".join(self._pending)
            self._pending.clear()
            if self._fd >= 0 and pending:
                data = memoryview(pending)
                while data:
                    data = data[os.write(self._fd, data):]
            if self._owned and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
