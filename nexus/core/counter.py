"""Counts encryptions per root key generation (NIST SP 800-38D: random 96-bit nonces
are safe for at most 2^32 encryptions under one key).

Counting in memory and flushing in batches keeps a store write off every
request; the count is best effort (a crash loses at most one batch), which is
fine because the rotation trigger sits far below the limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from nexus.store.base import Store


class EncryptionCounter:
    def __init__(self, store: Store, flush_every: int = 50_000, flush_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._pending: dict[int, int] = {}
        self._pending_total = 0
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._clock = clock
        self._last_flush = clock()
        self._lock = threading.Lock()

    def add(self, generation: int, n: int = 1) -> None:
        with self._lock:
            self._pending[generation] = self._pending.get(generation, 0) + n
            self._pending_total += n
            due = (self._pending_total >= self._flush_every
                   or self._clock() - self._last_flush >= self._flush_seconds)
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the pending counts, one generation at a time.

        If a write fails, that generation's count and every one not written yet go back
        to the pending counts (for the next flush) before the error propagates: no count
        is lost, and none that was written goes back.
        """
        with self._lock:
            pending, self._pending, self._pending_total = self._pending, {}, 0
            self._last_flush = self._clock()
        counts = list(pending.items())
        for i, (generation, n) in enumerate(counts):
            try:
                self._store.add_encryptions(generation, n)
            except Exception:
                self._keep(counts[i:])
                raise

    def _keep(self, unwritten: list[tuple[int, int]]) -> None:
        with self._lock:
            for generation, n in unwritten:
                self._pending[generation] = self._pending.get(generation, 0) + n
                self._pending_total += n

    def counts(self) -> dict[int, int]:
        stored = self._store.encryption_counts()
        with self._lock:
            for generation, n in self._pending.items():
                stored[generation] = stored.get(generation, 0) + n
        return stored
