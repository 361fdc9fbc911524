"""EncryptionCounter: a failed flush keeps every count it did not write."""

from __future__ import annotations

from typing import cast

import pytest

from nexus.core.counter import EncryptionCounter
from nexus.store.base import Store, StoreUnavailable


class FlakyCounts:
    """The two counter operations of a Store; writes for ``failing`` generations fail."""

    def __init__(self) -> None:
        self.stored: dict[int, int] = {}
        self.failing: set[int] = set()
        self.writes: list[tuple[int, int]] = []

    def add_encryptions(self, generation: int, n: int) -> None:
        if generation in self.failing:
            raise StoreUnavailable("sqlite: disk I/O error")
        self.writes.append((generation, n))
        self.stored[generation] = self.stored.get(generation, 0) + n

    def encryption_counts(self) -> dict[int, int]:
        return dict(self.stored)


def _counter(store: FlakyCounts) -> EncryptionCounter:
    return EncryptionCounter(cast(Store, store), flush_every=10**9, flush_seconds=1e9,
                             clock=lambda: 0.0)


def test_a_failed_write_loses_no_generation_count() -> None:
    store = FlakyCounts()
    counter = _counter(store)
    counter.add(1, 5)
    counter.add(2, 3)
    counter.add(3, 4)
    store.failing = {2}
    with pytest.raises(StoreUnavailable):
        counter.flush()
    assert store.stored == {1: 5}  # written before the failure
    # Generation 2 (failed) and 3 (not reached) are still pending, 1 is not counted twice.
    assert counter.counts() == {1: 5, 2: 3, 3: 4}
    counter.add(3, 1)
    store.failing = set()
    counter.flush()
    assert store.stored == {1: 5, 2: 3, 3: 5}
    assert counter.counts() == {1: 5, 2: 3, 3: 5}
    counter.flush()  # nothing pending: nothing written again
    assert store.writes == [(1, 5), (2, 3), (3, 5)]


def test_a_failed_first_write_keeps_everything() -> None:
    store = FlakyCounts()
    counter = _counter(store)
    counter.add(7, 2)
    counter.add(8, 1)
    store.failing = {7, 8}
    with pytest.raises(StoreUnavailable):
        counter.flush()
    assert store.stored == {}
    assert counter.counts() == {7: 2, 8: 1}
    store.failing = set()
    counter.flush()
    assert store.stored == {7: 2, 8: 1}
