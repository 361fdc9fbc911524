"""Pacing of a rotation's background work, and the rate it reports.

One :class:`Pacer` holds a loop over records to at most ``rate`` records per second (0: as fast
as it goes). Re-encryption and rollback use it; validation reads no records one by one (two
aggregate scans in the store, see ``nexus.core.rotation``), so it has nothing to pace.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# Items between two pauses inside a batch, and the shortest pause: enough for the foreground
# requests to get the GIL within a slice instead of waiting for the interpreter's switch
# interval behind a whole batch (tests/bench_rotation.py: get p99 while rotating).
SLICE = 16
MIN_PAUSE = 0.0001
# The reported rate is the records of the batches of the last RATE_WINDOW seconds.
RATE_WINDOW = 10.0


class Pacer:
    """At most ``rate`` items per second over a batch (``paced``) and between batches
    (``rest``); ``sleep`` is the engine's (tests pass one that returns at once)."""

    def __init__(self, rate: float, sleep: Callable[[float], None]) -> None:
        self.rate = rate
        self._sleep = sleep

    def paced(self, items: Sequence[T]) -> Iterable[T]:
        """``items``, with a pause after every SLICE of them that keeps the work from
        running ahead of the rate (counted from the first item)."""
        if self.rate <= 0:
            return items
        return self._slices(items)

    def _slices(self, items: Sequence[T]) -> Iterator[T]:
        begun = time.monotonic()
        for index, item in enumerate(items):
            if index and index % SLICE == 0:
                ahead = index / self.rate - (time.monotonic() - begun)
                self._sleep(max(ahead, MIN_PAUSE))
            yield item

    def rest(self, count: int, begun: float) -> None:
        """After a batch of ``count`` items begun at ``begun`` (``time.monotonic``): the pause
        that brings the batch as a whole down to the rate, if it ran ahead."""
        if self.rate <= 0:
            return
        wanted = count / self.rate
        elapsed = time.monotonic() - begun
        if wanted > elapsed:
            self._sleep(wanted - elapsed)


class RateMeter:
    """Records per second over the batches of the last RATE_WINDOW seconds."""

    def __init__(self) -> None:
        self._window: list[tuple[float, float, int]] = []  # (begun, ended, records)

    def observe(self, count: int, begun: float) -> float:
        """Add a batch of ``count`` records begun at ``begun``; the rate now: the records of
        the window's batches over the time since the first of them began (not ended, which
        counted its records without its time and showed early rates up to twice too high)."""
        now = time.monotonic()
        self._window.append((begun, now, count))
        self._window = [w for w in self._window if now - w[1] <= RATE_WINDOW]
        span = max(now - self._window[0][0], 1e-6)
        return sum(n for _, _, n in self._window) / span
