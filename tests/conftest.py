"""Shared fixtures: a real dev agent per session and a Nexus per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus.core.testpoints import Point
from tests.harness import DevAgent, Nexus, short_tmpdir

# The test point a gated Nexus holds its rotation at, batch by batch (nexus/core/testpoints.py).
GATE = Point.ROTATION_BETWEEN_BATCHES

# The real PostgreSQL server fixtures (pg_server, pg_dsn) for every test module.
pytest_plugins = ["tests.pg"]


@pytest.fixture(scope="session")
def agent_ca_dir() -> Iterator[Path]:
    path = short_tmpdir("ca-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def agent(agent_ca_dir: Path) -> Iterator[DevAgent]:
    running = DevAgent(ca_dir=agent_ca_dir)
    yield running
    running.stop()


@pytest.fixture()
def tmp() -> Iterator[Path]:
    """A private short directory (Unix socket paths must stay short), removed afterwards: for
    in-process stores, password files and exported copies (outside any Nexus data dir)."""
    path = short_tmpdir("t-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def data_dir() -> Iterator[Path]:
    path = short_tmpdir("nx-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def nexus(agent: DevAgent, data_dir: Path) -> Iterator[Nexus]:
    running = Nexus(data_dir, agent.env("nexus"))
    yield running
    running.stop()


@pytest.fixture()
def gated(agent: DevAgent, data_dir: Path) -> Iterator[tuple[Nexus, Path]]:
    """A Nexus whose rotation waits at GATE until the test creates a file in the gate dir."""
    gate = short_tmpdir("gate-")
    env = agent.env("nexus")
    env["SPIKE_NEXUS_TEST_GATE_AT"] = GATE
    env["SPIKE_NEXUS_TEST_GATE_DIR"] = str(gate)
    running = Nexus(data_dir, env)
    try:
        yield running, gate
    finally:
        (gate / "all").touch()
        running.stop()
        for child in gate.iterdir():
            child.unlink()
        gate.rmdir()
