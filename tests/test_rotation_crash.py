"""Rotation crash safety with real processes: kill -9 Nexus at named points, restart, recover.

Each case copies a prepared data directory (a root key, a few hundred secrets with several
versions each for some paths, one policy), starts Nexus with ``SPIKE_NEXUS_TEST_PAUSE_AT`` so
the rotation thread blocks at one point, kills the process with SIGKILL there, and starts a
fresh Nexus on the same directory. After ``spike recover`` the rotation resumes by itself and
``spike rotation watch --output json`` follows it to its terminal event. Then every version of
every secret must read back byte for byte, and the backup file must hold exactly the
generations that stored rows still reference.

Abort cases first stop a forward rotation mid-way (paused between batches), request
``spike rotation abort`` while its thread is blocked, kill -9, and kill again at a point inside
the rollback in the next Nexus; the third Nexus must finish the rollback.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nexus.core.testpoints import Point
from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import (
    operator_pb2,
    operator_pb2_grpc,
    policies_pb2,
    policies_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, pilot, pilot_json, short_tmpdir

PATHS = 300
MULTI = 20  # paths that get several versions
BATCH = "50"
# pytest-timeout guards against a hang, not a slow machine: these start real processes
# and must pass under nice -n 19 beside a CPU hog.
pytestmark = pytest.mark.timeout(900)
POLICY = ["policy", "put", "team-a", "--spiffe-id-pattern", "^spiffe://spike.internal/team-a/",
          "--path-pattern", "^team-a/", "--permissions", "read,list"]


def expected_secrets() -> dict[str, list[dict[str, str]]]:
    """path -> the data of version 1, 2, ... (values chosen to catch encoding slips)."""
    out: dict[str, list[dict[str, str]]] = {}
    for i in range(PATHS):
        out[f"app/{i % 7}/s{i:04d}"] = [{"k": f"v{i}", "pw": f"p\u00e4ss \"{i}\"\n\t\u2603"}]
    for j, path in enumerate(sorted(out)[:MULTI]):
        for v in range(2, 2 + 1 + j % 3):
            out[path].append({"k": f"{path}#{v}", "blob": "x" * (100 * v), "empty": ""})
    return out


def import_lines(expected: dict[str, list[dict[str, str]]]) -> str:
    lines = []
    depth = max(len(v) for v in expected.values())
    for version in range(depth):  # one line per version, in order
        for path, versions in expected.items():
            if version < len(versions):
                lines.append(json.dumps({"path": path, "data": versions[version]}))
    return "\n".join(lines) + "\n"


def pause_env(agent: DevAgent, point: Point | None, after: int = 1) -> dict[str, str]:
    env = agent.env("nexus")
    if point:
        env["SPIKE_NEXUS_TEST_PAUSE_AT"] = point
        env["SPIKE_NEXUS_TEST_PAUSE_AFTER"] = str(after)
    return env


def wait_paused(nexus: Nexus, point: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in nexus.log_events():
            if event.get("event") == "test pause point reached" and event.get("point") == point:
                return
        if nexus.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"Nexus never paused at {point}:\n" + "".join(nexus.lines[-30:]))


def recover(agent: DevAgent, nexus: Nexus) -> None:
    result = pilot(["recover", "--password-stdin", "--output", "json"], agent.env("pilot"),
                   nexus, stdin=TEST_PASSWORD + "\n")
    assert result.returncode == 0, (result.stdout, result.stderr, "".join(nexus.lines[-20:]))


def watch_events(agent: DevAgent, nexus: Nexus) -> tuple[int, list[dict[str, Any]]]:
    result = pilot(["rotation", "watch", "--output", "json"], agent.env("pilot"), nexus,
                   timeout=300)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, events


def referenced_generations(data_dir: Path) -> set[int]:
    db = sqlite3.connect(data_dir / "spike.db")
    try:
        rows = db.execute("SELECT DISTINCT generation FROM records WHERE blob IS NOT NULL")
        return {int(r[0]) for r in rows}
    finally:
        db.close()


def backup_generations(data_dir: Path) -> set[int]:
    doc = json.loads((data_dir / "root-key.backup").read_text())
    return {int(g["generation"]) for g in doc["generations"]}


def check_invariant(data_dir: Path) -> None:
    """Whatever the moment of death: no stored record needs a key missing from the backup."""
    assert referenced_generations(data_dir) <= backup_generations(data_dir)


def read_all(agent: DevAgent, nexus: Nexus) -> dict[str, list[dict[str, str]]]:
    """Every version of every expected secret, over one mTLS channel; also checks status."""
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        out: dict[str, list[dict[str, str]]] = {}
        for path, versions in expected_secrets().items():
            out[path] = [dict(stub.Get(secrets_pb2.GetSecretRequest(path=path, version=v),
                                       timeout=60).data)
                         for v in range(1, len(versions) + 1)]
            current = stub.Get(secrets_pb2.GetSecretRequest(path=path), timeout=60)
            assert current.version == len(versions), path
        policy = policies_pb2_grpc.PoliciesStub(channel).Get(
            policies_pb2.GetPolicyRequest(name="team-a"), timeout=60)
        assert policy.name == "team-a"
        operator = operator_pb2_grpc.OperatorStub(channel)
        nexus.status = operator.Status(operator_pb2.StatusRequest(), timeout=60)  # type: ignore[attr-defined]
        verified = operator.BackupVerify(
            operator_pb2.BackupVerifyRequest(password=TEST_PASSWORD.encode()), timeout=60)
        assert verified.ok, verified.detail
        nexus.verified_generations = set(verified.generations)  # type: ignore[attr-defined]
        return out
    finally:
        channel.close()


@pytest.fixture(scope="module")
def template(agent: DevAgent) -> Iterator[Path]:
    """A data directory holding the key, the secrets and a policy; Nexus stopped cleanly."""
    path = short_tmpdir("rct-")
    nexus = Nexus(path, agent.env("nexus"))
    try:
        env = agent.env("pilot")
        pilot_json(["init", "--password-stdin", "--output", "json"], env, nexus,
                   stdin=TEST_PASSWORD + "\n")
        lines = path.parent / (path.name + ".jsonl")
        lines.write_text(import_lines(expected_secrets()))
        summary = pilot_json(["secret", "import", "--file", str(lines), "--output", "json"],
                             env, nexus)
        lines.unlink()
        assert summary["failed"] == 0
        pilot_json([*POLICY, "--output", "json"], env, nexus)
    finally:
        assert nexus.stop() == 0
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def case_dir(template: Path) -> Iterator[Path]:
    path = short_tmpdir("rc-")
    shutil.rmtree(path)
    shutil.copytree(template, path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Crash:
    point: Point
    after: int = 1
    emergency: bool = False


# Forward rotation: where the first Nexus is killed.
FORWARD = {
    "precheck_done": Crash(Point.ROTATION_PRECHECK_DONE),
    "new_key_generated": Crash(Point.NEW_KEY_GENERATED),
    "backup_updated": Crash(Point.BACKUP_UPDATED, emergency=True),
    "new_key_done": Crash(Point.ROTATION_NEW_KEY_DONE),
    "first_batch_written": Crash(Point.ROTATION_BETWEEN_BATCHES),
    "mid_batch_written": Crash(Point.ROTATION_BETWEEN_BATCHES, after=4, emergency=True),
    "between_batches": Crash(Point.ROTATION_BETWEEN_BATCHES, after=3),
    "validate": Crash(Point.ROTATION_VALIDATE),
    "validated": Crash(Point.ROTATION_VALIDATED, emergency=True),
    "finalize_backup_dropped": Crash(Point.GENERATION_DROPPED_FROM_BACKUP),
    "finalized": Crash(Point.ROTATION_FINALIZED),
}

# Abort: the point inside the rollback where the second Nexus is killed ("" = none).
ABORT = {
    "abort_requested": None,
    "rollback_batch_written": Crash(Point.ROTATION_BETWEEN_BATCHES, after=2),
    "rollback_between_batches": Crash(Point.ROTATION_BETWEEN_BATCHES),
    "rolled_back": Crash(Point.ROTATION_ROLLED_BACK),
    "rollback_backup_dropped": Crash(Point.GENERATION_DROPPED_FROM_BACKUP),
    "abort_dropped": Crash(Point.ROTATION_ABORT_DROPPED),
}


def start_rotation(agent: DevAgent, nexus: Nexus, emergency: bool) -> None:
    args = ["rotate", "--detach", "--batch-size", BATCH, "--output", "json"]
    if emergency:
        args.append("--emergency")
    pilot_json(args, agent.env("pilot"), nexus)


def check_end_state(agent: DevAgent, nexus: Nexus, data_dir: Path, *, phase: str,
                    generation: int) -> None:
    code, events = watch_events(agent, nexus)
    assert events, "".join(nexus.lines[-30:])
    last = events[-1]
    assert last["terminal"] and last["phase"] == phase, (last, "".join(nexus.lines[-30:]))
    assert [e for e in events if e["terminal"]] == [last]
    assert code == (0 if phase == "completed" else 1)
    assert read_all(agent, nexus) == expected_secrets()
    if phase == "completed":
        # A key number handed out before a crash is never reused, so a rotation that
        # had to generate its key again ends one or more numbers higher.
        assert last["to_generation"] >= generation, last
        generation = last["to_generation"]
    status = nexus.status  # type: ignore[attr-defined]
    assert status.root_key_generation == generation
    assert dict(status.records_by_generation).keys() == {generation}
    assert list(status.backup.generations) == [generation]
    assert nexus.verified_generations == {generation}  # type: ignore[attr-defined]
    assert referenced_generations(data_dir) == {generation}
    assert backup_generations(data_dir) == {generation}


@pytest.mark.parametrize("name", list(FORWARD))
def test_kill9_during_rotation_resumes(agent: DevAgent, case_dir: Path, name: str) -> None:
    crash = FORWARD[name]
    first = Nexus(case_dir, pause_env(agent, crash.point, crash.after))
    try:
        recover(agent, first)
        start_rotation(agent, first, crash.emergency)
        wait_paused(first, crash.point)
    finally:
        first.kill()
    check_invariant(case_dir)
    second = Nexus(case_dir, agent.env("nexus"))
    try:
        recover(agent, second)
        check_end_state(agent, second, case_dir, phase="completed", generation=2)
    finally:
        second.stop()


@pytest.mark.parametrize("name", list(ABORT))
def test_kill9_during_abort_rolls_back(agent: DevAgent, case_dir: Path, name: str) -> None:
    crash = ABORT[name]
    # 1: a forward rotation blocked after its third batch (150 records under generation 2);
    #    the operator aborts it, then Nexus dies before the rollback starts.
    first = Nexus(case_dir, pause_env(agent, Point.ROTATION_BETWEEN_BATCHES, 3))
    try:
        recover(agent, first)
        start_rotation(agent, first, emergency=False)
        wait_paused(first, Point.ROTATION_BETWEEN_BATCHES)
        result = pilot(["rotation", "abort", "--detach", "--output", "json"],
                       agent.env("pilot"), first)
        assert result.returncode == 0, result.stderr
    finally:
        first.kill()
    check_invariant(case_dir)
    assert referenced_generations(case_dir) == {1, 2}
    # 2: the rollback starts by itself after recover; Nexus dies inside it.
    if crash is not None:
        second = Nexus(case_dir, pause_env(agent, crash.point, crash.after))
        try:
            recover(agent, second)
            wait_paused(second, crash.point)
        finally:
            second.kill()
        check_invariant(case_dir)
        if "batch" in name:  # really stopped half-way through the rollback
            assert referenced_generations(case_dir) == {1, 2}
    # 3: the rollback finishes: every record back under generation 1, generation 2 gone.
    third = Nexus(case_dir, agent.env("nexus"))
    try:
        recover(agent, third)
        check_end_state(agent, third, case_dir, phase="aborted", generation=1)
    finally:
        third.stop()
