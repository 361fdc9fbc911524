"""Shared fixtures: a real dev agent per session and a Nexus per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.harness import DevAgent, Nexus, short_tmpdir

# The real PostgreSQL server fixtures (pg_server, pg_dsn) for every test module.
pytest_plugins = ["tests.pg"]


@pytest.fixture(scope="session")
def agent_ca_dir() -> Iterator[object]:
    path = short_tmpdir("ca-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def agent(agent_ca_dir: object) -> Iterator[DevAgent]:
    running = DevAgent(ca_dir=agent_ca_dir)  # type: ignore[arg-type]
    yield running
    running.stop()


@pytest.fixture()
def data_dir() -> Iterator[object]:
    path = short_tmpdir("nx-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def nexus(agent: DevAgent, data_dir: object) -> Iterator[Nexus]:
    running = Nexus(data_dir, agent.env("nexus"))  # type: ignore[arg-type]
    yield running
    running.stop()
