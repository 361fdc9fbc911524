"""A generation cell edited while Nexus runs (a shared PostgreSQL, or an outside writer):
rotation selects records by that column, so a cell that already names the rotation's target
hid its record from re-encryption and the rotation ended FAILED in validation. The engine
now sets wrong cells right (from the ciphertext header) before it re-encrypts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus.store.base import BlobUpdate
from spike.states import RotationPhase
from tests.harness import World


@pytest.fixture()
def world(tmp: Path) -> Iterator[World]:
    running = World(tmp)
    yield running
    running.close()


def test_rotation_completes_over_a_cell_naming_its_target(world: World) -> None:
    expected = world.fill(paths=12, versions=2)
    inner = world.store._inner
    row = inner.get_secret("app/s003", 1)
    assert row.generation == 1 and row.blob is not None
    # The cell says 2 (the generation the rotation is about to create); the header says 1.
    assert inner.replace_blobs([BlobUpdate("secret", "app/s003", 1, 1, row.blob, 2,
                                           row.blob)]) == 1
    world.engine.start(caller="test", batch_size=5)
    state = world.wait()
    assert state.phase == RotationPhase.COMPLETED, (state.phase, state.message)
    world.read_all(expected)
    for (path, version) in expected:
        got = inner.get_secret(path, version)
        assert got.blob is not None
        assert got.generation == int.from_bytes(got.blob[1:5], "big") == 2, (path, version)
