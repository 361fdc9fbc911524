"""Reads and writes through the real server while a throttled rotation runs.

Writer threads each own a few paths and write increasing values with check-and-set; reader
threads read prepopulated secrets and the writers' paths. Every call must succeed, and at the
end each path's versions hold exactly the values written (no lost or clobbered write), all
under the new generation.

Nothing depends on timing: the rotation is held after its first batch at a test gate
(``SPIKE_NEXUS_TEST_GATE_AT``) until the load has made progress, so the load overlaps the
re-encryption on any machine; waits are for conditions, with generous deadlines.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import operator_pb2, operator_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, pilot_json
from tests.harness import wait_for_nexus as wait_for

PREPOPULATED = 500
WRITERS = 3
PATHS_PER_WRITER = 2
READERS = 2
MAX_VERSIONS = 10  # Nexus's default --max-secret-versions
RPC_TIMEOUT = 60  # generous: the suite must pass beside a CPU hog under nice -n 19
LOAD_STEP = 10  # calls the load must make while the rotation is held, and after its end
# pytest-timeout guards against a hang, not a slow machine: these start real processes
# and must pass under nice -n 19 beside a CPU hog.
pytestmark = pytest.mark.timeout(900)


def value(path: str, version: int) -> dict[str, str]:
    return {"n": str(version), "path": path, "pad": "\u00e9" * (version % 7)}


class Load:
    """Writer and reader threads against one Nexus; every failure is kept in ``errors``."""

    def __init__(self, secrets: secrets_pb2_grpc.SecretsStub) -> None:
        self.secrets = secrets
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.written: dict[str, int] = {}  # path -> last version written (acknowledged)
        self.calls = {"put": 0, "get": 0}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.writer, args=(w,)) for w in range(WRITERS)]
        self.threads += [threading.Thread(target=self.reader, args=(r,))
                         for r in range(READERS)]

    def failed(self, what: str, exc: BaseException) -> None:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else repr(exc)
        with self.lock:
            self.errors.append(f"{what}: {detail}")

    def writer(self, w: int) -> None:
        paths = [f"load/w{w}/p{j}" for j in range(PATHS_PER_WRITER)]
        current = dict.fromkeys(paths, 0)
        while not self.stop.is_set():
            for path in paths:
                version = current[path] + 1
                try:
                    resp = self.secrets.Put(secrets_pb2.PutSecretRequest(
                        path=path, data=value(path, version), cas=current[path]),
                        timeout=RPC_TIMEOUT)
                except Exception as exc:
                    self.failed(f"put {path} cas={current[path]}", exc)
                    return
                if resp.version != version:
                    self.failed(f"put {path}", AssertionError(f"got version {resp.version}"))
                    return
                current[path] = version
                with self.lock:
                    self.written[path] = version
                    self.calls["put"] += 1

    def reader(self, r: int) -> None:
        rng = random.Random(r)
        while not self.stop.is_set():
            i = rng.randrange(PREPOPULATED)
            try:
                got = self.secrets.Get(secrets_pb2.GetSecretRequest(path=f"pre/{i:04d}"),
                                       timeout=RPC_TIMEOUT)
                if dict(got.data) != {"i": str(i)}:
                    raise AssertionError(f"pre/{i:04d} read {dict(got.data)}")
                with self.lock:
                    mine = [p for p in self.written if self.written[p] > 0]
                if mine:
                    path = rng.choice(mine)
                    got = self.secrets.Get(secrets_pb2.GetSecretRequest(path=path),
                                           timeout=RPC_TIMEOUT)
                    if dict(got.data) != value(path, got.version):
                        raise AssertionError(f"{path} v{got.version} read {dict(got.data)}")
            except Exception as exc:
                self.failed("get", exc)
                return
            with self.lock:
                self.calls["get"] += 2 if mine else 1

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(RPC_TIMEOUT)

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.calls["put"], self.calls["get"]

    def grew_by(self, step: int) -> Callable[[], bool]:
        puts, gets = self.counts()
        # An error ends the wait too: it is reported by the assertions below.
        return lambda: bool(self.errors) or min(self.counts()[0] - puts,
                                                self.counts()[1] - gets) >= step


def phase_name(event: operator_pb2.RotationEvent) -> str:
    return operator_pb2.RotationPhase.Name(event.phase).removeprefix("ROTATION_PHASE_").lower()


def follow_to_the_end(operator: operator_pb2_grpc.OperatorStub, load: Load,
                      seen_phases: list[str]) -> operator_pb2.RotationEvent:
    """Poll the rotation's status until it is terminal; phases seen are added in order."""
    deadline = time.monotonic() + 300
    while True:
        event = operator.RotationStatus(operator_pb2.RotationStatusRequest(),
                                        timeout=RPC_TIMEOUT)
        phase = phase_name(event)
        if seen_phases[-1] != phase:
            seen_phases.append(phase)
        if event.terminal:
            return event
        assert not load.errors, load.errors
        assert time.monotonic() < deadline, seen_phases
        time.sleep(0.05)


def check_every_version(secrets: secrets_pb2_grpc.SecretsStub, written: dict[str, int],
                        data_dir: Path) -> None:
    """No lost or clobbered write: every kept version holds exactly what was written to it;
    every prepopulated secret reads back; everything is under the new generation."""
    assert len(written) == WRITERS * PATHS_PER_WRITER
    for path, last in written.items():
        meta = secrets.Metadata(secrets_pb2.SecretMetadataRequest(path=path), timeout=RPC_TIMEOUT)
        assert meta.current_version == last, path
        for version in range(max(1, last - MAX_VERSIONS + 1), last + 1):
            got = secrets.Get(secrets_pb2.GetSecretRequest(path=path, version=version),
                              timeout=RPC_TIMEOUT)
            assert (got.version, dict(got.data)) == (version, value(path, version))
    for i in range(PREPOPULATED):
        got = secrets.Get(secrets_pb2.GetSecretRequest(path=f"pre/{i:04d}"), timeout=RPC_TIMEOUT)
        assert dict(got.data) == {"i": str(i)}
    db = sqlite3.connect(data_dir / "spike.db")
    try:
        gens = {g for (g,) in db.execute(
            "SELECT DISTINCT generation FROM records WHERE blob IS NOT NULL")}
    finally:
        db.close()
    assert gens == {2}


def test_reads_and_writes_during_rotation(agent: DevAgent, data_dir: Path,
                                          gated: tuple[Nexus, Path]) -> None:
    nexus, gate = gated
    env = agent.env("pilot")
    pilot_json(["init", "--password-stdin", "--output", "json"], env, nexus,
               stdin=TEST_PASSWORD + "\n")
    lines = data_dir / "import.jsonl"
    lines.write_text("".join(json.dumps({"path": f"pre/{i:04d}", "data": {"i": str(i)}}) + "\n"
                             for i in range(PREPOPULATED)))
    assert pilot_json(["secret", "import", "--file", str(lines), "--output", "json"],
                      env, nexus)["failed"] == 0

    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    secrets = secrets_pb2_grpc.SecretsStub(channel)
    operator = operator_pb2_grpc.OperatorStub(channel)
    load = Load(secrets)
    load.start()
    try:
        wait_for("load before the rotation", load.grew_by(LOAD_STEP), nexus)
        assert not load.errors, load.errors
        started = pilot_json(["rotate", "--detach", "--batch-size", "25", "--max-rate", "250",
                              "--output", "json"], env, nexus)
        assert started["from_generation"] == 1
        # Held after the first batch: the load goes on meanwhile, under both keys.
        wait_for("the first batch held at the gate", lambda: any(
            e.get("event") == "test gate reached" for e in nexus.log_events()), nexus)
        held = operator.RotationStatus(operator_pb2.RotationStatusRequest(),
                                       timeout=RPC_TIMEOUT)
        seen_phases = [phase_name(held)]
        before = load.counts()
        wait_for("load during the re-encryption", load.grew_by(LOAD_STEP), nexus)
        during = load.counts()
        assert not load.errors, load.errors
        (gate / "all").touch()
        event = follow_to_the_end(operator, load, seen_phases)
        wait_for("load after the end", load.grew_by(LOAD_STEP), nexus)  # a little after too
    finally:
        load.end()
    assert not load.errors, load.errors
    assert phase_name(event) == "completed", (seen_phases, event.message)
    assert seen_phases[0] == "reencrypt", seen_phases
    # The load really overlapped the re-encryption (it ran while the rotation was held).
    assert during[0] - before[0] >= LOAD_STEP and during[1] - before[1] >= LOAD_STEP
    assert load.calls["put"] >= 50 and load.calls["get"] >= 50, load.calls
    check_every_version(secrets, load.written, data_dir)
    channel.close()
