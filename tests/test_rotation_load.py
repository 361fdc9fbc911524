"""Reads and writes through the real server while a throttled rotation runs.

Writer threads each own a few paths and write increasing values with check-and-set; reader
threads read prepopulated secrets and the writers' paths. Every call must succeed, and at the
end each path's versions hold exactly the values written (no lost or clobbered write), all
under the new generation.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path

import grpc

from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import operator_pb2, operator_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, pilot_json

PREPOPULATED = 500
WRITERS = 3
PATHS_PER_WRITER = 2
READERS = 2
MAX_VERSIONS = 10  # Nexus's default --max-secret-versions


def value(path: str, version: int) -> dict[str, str]:
    return {"n": str(version), "path": path, "pad": "\u00e9" * (version % 7)}


def test_reads_and_writes_during_rotation(agent: DevAgent, nexus: Nexus,
                                          data_dir: Path) -> None:
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
                        path=path, data=value(path, version), cas=current[path]), timeout=10)
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
                got = secrets.Get(secrets_pb2.GetSecretRequest(path=f"pre/{i:04d}"), timeout=10)
                if dict(got.data) != {"i": str(i)}:
                    raise AssertionError(f"pre/{i:04d} read {dict(got.data)}")
                with lock:
                    mine = [p for p in written if written[p] > 0]
                if mine:
                    path = rng.choice(mine)
                    got = secrets.Get(secrets_pb2.GetSecretRequest(path=path), timeout=10)
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
    try:
        time.sleep(0.3)  # load is running before the rotation starts
        started = pilot_json(["rotate", "--detach", "--batch-size", "25", "--max-rate", "250",
                              "--output", "json"], env, nexus)
        assert started["from_generation"] == 1
        seen_phases: list[str] = []
        puts_at: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while True:
            event = operator.RotationStatus(operator_pb2.RotationStatusRequest(), timeout=10)
            phase = operator_pb2.RotationPhase.Name(event.phase).removeprefix(
                "ROTATION_PHASE_").lower()
            if not seen_phases or seen_phases[-1] != phase:
                seen_phases.append(phase)
                with lock:
                    puts_at[phase] = calls["put"]
            if event.terminal:
                break
            assert not errors, errors
            assert time.monotonic() < deadline, seen_phases
            time.sleep(0.05)
        time.sleep(0.2)  # a little load after the end too
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert phase == "completed", (seen_phases, event.message)
    assert "reencrypt" in seen_phases
    # The load really overlapped the re-encryption.
    after_reencrypt = next(p for p in seen_phases[seen_phases.index("reencrypt") + 1:])
    assert puts_at[after_reencrypt] > puts_at["reencrypt"], (puts_at, seen_phases)
    assert calls["put"] >= 50 and calls["get"] >= 50, calls

    # No lost or clobbered write: every kept version holds exactly what was written to it.
    assert len(written) == WRITERS * PATHS_PER_WRITER
    for path, last in written.items():
        meta = secrets.Metadata(secrets_pb2.SecretMetadataRequest(path=path), timeout=10)
        assert meta.current_version == last, path
        for version in range(max(1, last - MAX_VERSIONS + 1), last + 1):
            got = secrets.Get(secrets_pb2.GetSecretRequest(path=path, version=version),
                              timeout=10)
            assert (got.version, dict(got.data)) == (version, value(path, version))
    for i in range(PREPOPULATED):
        got = secrets.Get(secrets_pb2.GetSecretRequest(path=f"pre/{i:04d}"), timeout=10)
        assert dict(got.data) == {"i": str(i)}
    channel.close()
    db = sqlite3.connect(data_dir / "spike.db")
    try:
        gens = {g for (g,) in db.execute(
            "SELECT DISTINCT generation FROM records WHERE blob IS NOT NULL")}
    finally:
        db.close()
    assert gens == {2}
