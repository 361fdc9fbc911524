"""The audit trail: append-only JSON lines, hash-chained (see spike.audit_chain).

One event per security-relevant action: who (caller SPIFFE ID), what
(action, target), and the outcome. Never a value, a password or a key.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from spike.audit_chain import GENESIS, MAX_LINE_BYTES, event_hash, sealed_line
from spike.errors import SpikeError

_log = structlog.get_logger("nexus.audit")


ANCHOR_EVERY = 100
MAX_FIELD_CHARS = 256  # a detail string
MAX_LIST_ITEMS = 16
MAX_ID_BYTES = 2048  # caller and target (a SPIFFE ID is at most 2048 bytes), marker included
_ID_FAST_CHARS = MAX_ID_BYTES // 4  # this many code points always fit in MAX_ID_BYTES
TAIL_BLOCK = 64 * 1024  # start-up reads the trail backwards in blocks of this size
TORN_SUFFIX = ".torn"


_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escaped(text: str) -> list[str]:
    """``text`` in pieces, each non-printable character (control and format characters,
    separators other than the space, lone surrogates) and each backslash escaped as
    Python's repr() would: readable, unambiguous, and never a raw control character."""
    return [ch if ch != "\\" and ch.isprintable() else _escape_char(ch) for ch in text]


def _truncated(pieces: list[str], limit: int, marker: str) -> str:
    """The longest run of whole pieces that, with ``marker``, fits in ``limit`` UTF-8 bytes."""
    budget = limit - len(marker.encode())
    out: list[str] = []
    for piece in pieces:
        size = len(piece.encode("utf-8"))
        if size > budget:
            break
        budget -= size
        out.append(piece)
    return "".join(out) + marker


def bounded_identity(text: str) -> str:
    """A caller or target as the trail keeps it: at most MAX_ID_BYTES of UTF-8, non-printable
    characters escaped, a longer value cut with a marker naming its original length in bytes."""
    if len(text) <= _ID_FAST_CHARS and text.isprintable() and "\\" not in text:
        return text  # the hot path: a well-formed ID or path, returned as it is
    pieces = _escaped(text)
    escaped = "".join(pieces)
    if len(escaped.encode("utf-8")) <= MAX_ID_BYTES:
        return escaped
    original = len(text.encode("utf-8", "surrogatepass"))
    return _truncated(pieces, MAX_ID_BYTES, f"...({original} bytes)")


def _bounded(text: str) -> str:
    """A detail string: at most MAX_FIELD_CHARS characters once escaped, then a marker."""
    if len(text) <= MAX_FIELD_CHARS and text.isprintable() and "\\" not in text:
        return text
    kept: list[str] = []
    used = 0
    for piece in _escaped(text[:MAX_FIELD_CHARS]):
        used += len(piece)
        if used > MAX_FIELD_CHARS:
            break
        kept.append(piece)
    if len(kept) == len(text):
        return "".join(kept)
    return f"{''.join(kept)}...({len(text)} chars)"


def _bounded_value(value: Any) -> Any:
    if isinstance(value, str):
        return _bounded(value)
    if isinstance(value, list | tuple):
        items = [_bounded(v) if isinstance(v, str) else v for v in value[:MAX_LIST_ITEMS]]
        if len(value) > MAX_LIST_ITEMS:
            items.append(f"...({len(value)} items)")
        return items
    return value


class AuditTrailError(SpikeError):
    """The trail cannot be opened for appending (in use, or its last line is damaged)."""


@dataclass(frozen=True)
class TrailTail:
    """What start-up learns from the end of the trail (never reading the rest of it)."""

    prev: str  # the hash the next line chains to
    good_end: int  # offset just past the last complete line
    size: int  # the file's size: ``size - good_end`` bytes are a torn last line
    bytes_read: int

    @property
    def torn_bytes(self) -> int:
        return self.size - self.good_end


class _Backwards:
    """Reads a file from the end towards the start, in blocks; counts the bytes read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes_read = 0

    def read(self, start: int, end: int) -> bytes:
        data = os.pread(self.fd, end - start, start)
        self.bytes_read += len(data)
        if len(data) != end - start:
            raise AuditTrailError("the audit trail shrank while it was being read")
        return data

    def last_newline(self, end: int, floor: int = 0) -> int:
        """The offset of the last line break in ``[floor, end)``, or -1."""
        while end > floor:
            start = max(floor, end - TAIL_BLOCK)
            found = self.read(start, end).rfind(b"\n")
            if found >= 0:
                return start + found
            end = start
        return -1


def read_tail(fd: int, name: str = "the audit trail") -> TrailTail:
    """Find the last complete line of the trail open on ``fd`` and the hash it ends with.

    A torn last line (bytes after the last line break: a write cut short by a full disk or
    a crash) is reported, not parsed. Blank lines are skipped, as ``spike audit verify``
    skips them. Raises :class:`AuditTrailError` if the last complete line is not a sealed
    event: Nexus does not guess where the chain goes on.
    """
    size = os.fstat(fd).st_size
    reader = _Backwards(fd)
    good_end = reader.last_newline(size) + 1
    end = good_end  # the end of the line under examination, its line break included
    floor = max(0, good_end - MAX_LINE_BYTES - 1)
    while end > 0:
        start = reader.last_newline(end - 1, floor) + 1
        if start == 0 and floor > 0:
            raise AuditTrailError(
                f"{name}: no event in the last {MAX_LINE_BYTES} bytes before byte {good_end} "
                f"(a line that long is not one Nexus writes); check it with "
                f"`spike audit verify {name}`, then move the file aside to start a new trail")
        line = reader.read(start, end - 1)
        if line.strip():
            try:
                prev = event_hash(line)
            except ValueError as exc:
                raise AuditTrailError(
                    f"{name}: the last complete line (at byte {start}) is not a sealed audit "
                    f"event ({exc}); check it with `spike audit verify {name}`, then move the "
                    f"file aside to start a new trail") from None
            return TrailTail(prev, good_end, size, reader.bytes_read)
        end = start
    return TrailTail(GENESIS, good_end, size, reader.bytes_read)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_torn_tail(fd: int, path: Path, tail: TrailTail) -> tuple[Path, str]:
    """Copy the torn bytes to a new ``<trail>.torn`` (then ``.torn.1``, ...: an existing
    one is never overwritten), fsync it, and only then cut them off the trail: a crash in
    between leaves the bytes in both places, never in neither. Returns the new file and
    the SHA-256 of the bytes moved."""
    digest = hashlib.sha256()
    for n in range(10_000):
        dest = path.with_name(path.name + TORN_SUFFIX + (f".{n}" if n else ""))
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        break
    else:
        raise AuditTrailError(f"{path}: too many {TORN_SUFFIX} files beside it")
    try:
        try:
            offset = tail.good_end
            while offset < tail.size:
                chunk = os.pread(fd, min(TAIL_BLOCK, tail.size - offset), offset)
                if not chunk:
                    raise AuditTrailError(f"{path} shrank while its torn tail was being moved")
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                offset += len(chunk)
            os.fsync(out)
        finally:
            os.close(out)
        _fsync_dir(dest.parent)
    except BaseException as exc:  # the trail is left as it was, the partial copy removed
        dest.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # the disk is still full, say
            raise AuditTrailError(
                f"{path} ends with a torn line that cannot be moved aside to {dest.name} "
                f"({exc.strerror}); nothing was changed: free some space and start again"
            ) from None
        raise
    os.ftruncate(fd, tail.good_end)
    os.fsync(fd)
    return dest, digest.hexdigest()


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
        torn: dict[str, Any] | None = None
        if target == "-":
            self._fd = sys.stderr.fileno()
            self._prev = GENESIS
            self._fsync = False
            self._owned = False
        else:
            path = Path(target)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as exc:
                raise AuditTrailError(f"cannot open the audit trail {path}: "
                                      f"{exc.strerror}") from None
            self._owned = True
            try:
                torn = self._open_tail(path)
            except BaseException as exc:
                os.close(self._fd)
                if isinstance(exc, OSError):
                    raise AuditTrailError(f"cannot open the audit trail {path}: "
                                          f"{exc.strerror}") from None
                raise
        self._seq = 0
        self._pending: list[bytes] = []
        self._writing = False
        self._written = 0  # highest seq handed to the kernel
        self._waiters = 0  # threads waiting on _written_cond (durable records, close)
        if torn is not None:
            try:
                self.record("audit.torn_tail", caller="(nexus)", target=target, outcome="ok",
                            durable=True, **torn)
            except OSError as exc:  # the bytes are moved and logged; the disk is still full
                os.close(self._fd)
                raise AuditTrailError(f"cannot write to the audit trail {target}: "
                                      f"{exc.strerror}") from None

    def _open_tail(self, path: Path) -> dict[str, Any] | None:
        """Lock the trail, find where its chain ends, and move a torn last line aside.

        Returns the details of a moved torn tail (for its audit event), else ``None``."""
        self._prev = GENESIS
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            return None  # a FIFO or a device: nothing to lock or read back
        try:
            # A POSIX lock: another process (a second Nexus) is refused, this one is not.
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise AuditTrailError(f"the audit trail {path} is in use by another process "
                                  "(another Nexus?)") from None
        tail = read_tail(self._fd, str(path))
        self._prev = tail.prev
        if not tail.torn_bytes:
            return None
        dest, digest = move_torn_tail(self._fd, path, tail)
        _log.warning("audit trail had a torn last line (a write cut short: disk full or a "
                     "crash); its bytes were moved aside and the chain goes on from the last "
                     "complete line", file=str(path), torn_bytes=tail.torn_bytes,
                     offset=tail.good_end, moved_to=str(dest), sha256=digest)
        return {"torn_bytes": tail.torn_bytes, "offset": tail.good_end, "moved_to": dest.name,
                "sha256": digest}

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
        caller = bounded_identity(caller)
        target = bounded_identity(target)
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
            self._wait_written(seq)
        # The operational log repeats the chain hash as an independent anchor that reveals
        # a truncated audit file (the chain alone cannot): for every lifecycle event and
        # refusal, and every ANCHOR_EVERY-th routine one (not each read: that doubled the
        # cost of a secret get).
        if durable or outcome != "ok" or seq % ANCHOR_EVERY == 0:
            _log.info("audit", action=action, caller=caller, target=target, outcome=outcome,
                      seq=seq, chain=chain[:16])

    def record_many(self, action: str, *, caller: str,
                    events: Sequence[tuple[str, str, Mapping[str, Any] | None]]) -> None:
        """Append one event per ``(target, outcome, detail)``, each exactly as
        :meth:`record` would (same fields, same chain), under one round of the lock and one
        write: a bulk import audits each of its entries at a fraction of the cost."""
        caller = bounded_identity(caller)
        anchors: list[tuple[str, str, int, str]] = []
        with self._lock:
            for target, outcome, detail in events:
                self._seq += 1
                event: dict[str, Any] = {
                    "ts": round(time.time(), 6),
                    "action": action,
                    "caller": caller,
                    "target": bounded_identity(target),
                    "outcome": outcome,
                }
                if detail:
                    event["detail"] = {k: _bounded_value(v) for k, v in detail.items()}
                line, chain = sealed_line(self._prev, event)
                self._prev = chain
                self._pending.append(line)
                if outcome != "ok" or self._seq % ANCHOR_EVERY == 0:
                    anchors.append((event["target"], outcome, self._seq, chain))
            batch = None if self._writing else self._take()
        if batch is not None:
            self._drain(batch)
        for target, outcome, seq, chain in anchors:
            _log.info("audit", action=action, caller=caller, target=target, outcome=outcome,
                      seq=seq, chain=chain[:16])

    def _wait_written(self, seq: int) -> None:
        """Block until line ``seq`` is written (writing it ourselves if the writer failed),
        then fsync."""
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
