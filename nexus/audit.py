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
    def __init__(self, target: str) -> None:
        self._lock = threading.Lock()
        self._fsync = True
        # Each line goes out with one write(2) on an O_APPEND descriptor: no user-space
        # buffer to lose on a crash, and no flush call per event.
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
        """Append one event. ``durable`` fsyncs (lifecycle events).

        Request-derived fields are bounded (audited before validation, a caller could
        otherwise grow the trail by megabytes per call).
        """
        target = _bounded(target)
        detail = {k: _bounded_value(v) for k, v in detail.items()}
        with self._lock:
            self._seq += 1
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
            data = line.encode("utf-8")
            while data:
                data = data[os.write(self._fd, data):]
            if durable and self._fsync:
                os.fsync(self._fd)
            self._prev = chain
            anchor = durable or outcome != "ok" or self._seq % ANCHOR_EVERY == 0
        # The operational log repeats the chain hash as an independent anchor that reveals
        # a truncated audit file (the chain alone cannot): for every lifecycle event and
        # refusal, and every ANCHOR_EVERY-th routine one (not each read: that doubled the
        # cost of a secret get).
        if anchor:
            _log.info("audit", action=action, caller=caller, target=target, outcome=outcome,
                      seq=self._seq, chain=chain[:16])

    def close(self) -> None:
        with self._lock:
            if self._owned and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
