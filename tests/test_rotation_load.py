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
from typing import Any

import grpc
import pytest

from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import operator_pb2, operator_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, pilot_json

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


def wait_for(what: str, check: Callable[[], Any], nexus: Nexus, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline or nexus.proc.poll() is not None:
            raise AssertionError(f"no {what}:\n" + "".join(nexus.lines[-40:]))
        time.sleep(0.02)
    return got




def value(path: str, version: int) -> dict[str, str]:
    return {"n": str(version), "path": path, "pad": "\u00e9" * (version % 7)}


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
    stop = threading.Event()
    errors: list[str] = []
    written: dict[str, int] = {}  # path -> last version written (acknowledged)
    calls = {"put": 0, "get": 0}
    lock = threading.Lock()

    def failed(what: str, exc: BaseException) -> None:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else repr(exc)
        with lock:
            errors.append(f"{what}: {detail}")

    def writer(w: int) -> None:
        paths = [f"load/w{w}/p{j}" for j in range(PATHS_PER_WRITER)]
        current = dict.fromkeys(paths, 0)
        while not stop.is_set():
            for path in paths:
                version = current[path] + 1
                try:
                    resp = secrets.Put(secrets_pb2.PutSecretRequest(
                        path=path, data=value(path, version), cas=current[path]),
                        timeout=RPC_TIMEOUT)
                except Exception as exc:
                    failed(f"put {path} cas={current[path]}", exc)
                    return
                if resp.version != version:
                    failed(f"put {path}", AssertionError(f"got version {resp.version}"))
                    return
                current[path] = version
                with lock:
                    written[path] = version
                    calls["put"] += 1

    def reader(r: int) -> None:
        rng = random.Random(r)
        while not stop.is_set():
            i = rng.randrange(PREPOPULATED)
            try:
                got = secrets.Get(secrets_pb2.GetSecretRequest(path=f"pre/{i:04d}"),
                                  timeout=RPC_TIMEOUT)
                if dict(got.data) != {"i": str(i)}:
                    raise AssertionError(f"pre/{i:04d} read {dict(got.data)}")
                with lock:
                    mine = [p for p in written if written[p] > 0]
                if mine:
                    path = rng.choice(mine)
                    got = secrets.Get(secrets_pb2.GetSecretRequest(path=path), timeout=RPC_TIMEOUT)
                    if dict(got.data) != value(path, got.version):
                        raise AssertionError(f"{path} v{got.version} read {dict(got.data)}")
            except Exception as exc:
                failed("get", exc)
                return
            with lock:
                calls["get"] += 2 if mine else 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(READERS)]
    for t in threads:
        t.start()

    def load() -> tuple[int, int]:
        with lock:
            return calls["put"], calls["get"]

    def load_grew_by(step: int) -> Callable[[], bool]:
        puts, gets = load()
        # An error ends the wait too: it is reported by the assertions below.
        return lambda: bool(errors) or min(load()[0] - puts, load()[1] - gets) >= step

    try:
        wait_for("load before the rotation", load_grew_by(LOAD_STEP), nexus)
        assert not errors, errors
        started = pilot_json(["rotate", "--detach", "--batch-size", "25", "--max-rate", "250",
                              "--output", "json"], env, nexus)
        assert started["from_generation"] == 1
        # Held after the first batch: the load goes on meanwhile, under both keys.
        wait_for("the first batch held at the gate", lambda: any(
            e.get("event") == "test gate reached" for e in nexus.log_events()), nexus)
        held = operator.RotationStatus(operator_pb2.RotationStatusRequest(),
                                       timeout=RPC_TIMEOUT)
        seen_phases = [operator_pb2.RotationPhase.Name(held.phase).removeprefix(
            "ROTATION_PHASE_").lower()]
        before = load()
        wait_for("load during the re-encryption", load_grew_by(LOAD_STEP), nexus)
        during = load()
        assert not errors, errors
        (gate / "all").touch()
        deadline = time.monotonic() + 300
        while True:
            event = operator.RotationStatus(operator_pb2.RotationStatusRequest(),
                                            timeout=RPC_TIMEOUT)
            phase = operator_pb2.RotationPhase.Name(event.phase).removeprefix(
                "ROTATION_PHASE_").lower()
            if seen_phases[-1] != phase:
                seen_phases.append(phase)
            if event.terminal:
                break
            assert not errors, errors
            assert time.monotonic() < deadline, seen_phases
            time.sleep(0.05)
        wait_for("load after the end", load_grew_by(LOAD_STEP), nexus)  # a little after too
    finally:
        stop.set()
        for t in threads:
            t.join(RPC_TIMEOUT)
    assert not errors, errors
    assert phase == "completed", (seen_phases, event.message)
    assert seen_phases[0] == "reencrypt", seen_phases
    # The load really overlapped the re-encryption (it ran while the rotation was held).
    assert during[0] - before[0] >= LOAD_STEP and during[1] - before[1] >= LOAD_STEP
    assert calls["put"] >= 50 and calls["get"] >= 50, calls

    # No lost or clobbered write: every kept version holds exactly what was written to it.
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
    channel.close()
    db = sqlite3.connect(data_dir / "spike.db")
    try:
        gens = {g for (g,) in db.execute(
            "SELECT DISTINCT generation FROM records WHERE blob IS NOT NULL")}
    finally:
        db.close()
    assert gens == {2}
