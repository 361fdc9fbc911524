"""Several watchers of one rotation: real Pilot processes with --output json and a raw stream.

Two watchers attach at the start, one attaches late, one is killed mid-way and a raw gRPC
stream is cancelled after a few events. Every complete watcher sees a strictly increasing
sequence, progress that never goes back within a phase, identical events for the same
sequence number, and exactly one terminal event, last. The rotation completes regardless of
the watchers that left.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import operator_pb2, operator_pb2_grpc
from tests.harness import PY, TEST_PASSWORD, DevAgent, Nexus, pilot, pilot_json


def spawn_watcher(agent: DevAgent, nexus: Nexus) -> subprocess.Popen[str]:
    env = agent.env("pilot")
    env["SPIKE_NEXUS_ADDR"] = nexus.address
    return subprocess.Popen([PY, "-m", "pilot", "rotation", "watch", "--output", "json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, list[dict[str, Any]], str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, [json.loads(line) for line in out.splitlines() if line.strip()], err


def check_stream(events: list[dict[str, Any]]) -> None:
    assert events
    sequences = [e["sequence"] for e in events]
    assert all(a < b for a, b in itertools.pairwise(sequences)), sequences
    for a, b in itertools.pairwise(events):
        if a["phase"] == b["phase"]:
            assert b["done"] >= a["done"], (a, b)
        assert a["rotation_id"] == b["rotation_id"]
    terminal = [e for e in events if e["terminal"]]
    assert terminal == [events[-1]] and events[-1]["phase"] == "completed"


def phase_of(event: Any) -> str:
    return operator_pb2.RotationPhase.Name(event.phase).removeprefix("ROTATION_PHASE_").lower()


def test_two_watchers_a_late_one_and_leavers(agent: DevAgent, nexus: Nexus,
                                             data_dir: Path) -> None:
    env = agent.env("pilot")
    pilot_json(["init", "--password-stdin", "--output", "json"], env, nexus,
               stdin=TEST_PASSWORD + "\n")
    lines = data_dir / "import.jsonl"
    lines.write_text("".join(json.dumps({"path": f"w/{i:04d}", "data": {"i": str(i)}}) + "\n"
                             for i in range(400)))
    pilot_json(["secret", "import", "--file", str(lines), "--output", "json"], env, nexus)

    # Nothing to watch yet: a clear answer, exit 1.
    idle = pilot(["rotation", "watch", "--output", "json"], env, nexus)
    assert idle.returncode == 1 and json.loads(idle.stdout)["phase"] == "idle"

    pilot_json(["rotate", "--detach", "--batch-size", "20", "--max-rate", "150",
                "--output", "json"], env, nexus)
    first, second, leaver = (spawn_watcher(agent, nexus) for _ in range(3))
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    operator = operator_pb2_grpc.OperatorStub(channel)
    raw = operator.WatchRotation(operator_pb2.WatchRotationRequest())
    raw_events = []
    for event in raw:
        raw_events.append(event)
        if len(raw_events) == 3:
            raw.cancel()  # a client that goes away mid-stream
            break
    assert [e.sequence for e in raw_events] == sorted({e.sequence for e in raw_events})

    time.sleep(1.0)
    status = pilot_json(["rotation", "status", "--output", "json"], env, nexus)
    assert not status["terminal"], "the rotation ended before the late watcher attached"
    late = spawn_watcher(agent, nexus)
    leaver.send_signal(signal.SIGKILL)  # a Pilot that dies mid-watch
    leaver.wait(10)

    results = {name: finish(proc) for name, proc in
               (("first", first), ("second", second), ("late", late))}
    by_sequence: dict[int, dict[str, Any]] = {}
    for name, (code, events, err) in results.items():
        assert code == 0, (name, err)
        check_stream(events)
        for event in events:
            # Every watcher saw the same state under the same sequence number.
            assert by_sequence.setdefault(event["sequence"], event) == event, name
    assert results["late"][1][0]["sequence"] > results["first"][1][0]["sequence"]
    assert results["late"][1][0]["done"] > 0  # its snapshot shows progress made so far
    assert results["first"][1][-1]["done"] == 400
    assert any(e["phase"] == "reencrypt" for e in results["late"][1])

    # The rotation finished although watchers left; a watcher attaching now gets the
    # terminal snapshot and exits 0.
    after = pilot(["rotation", "watch", "--output", "json"], env, nexus)
    assert after.returncode == 0
    (only,) = [json.loads(line) for line in after.stdout.splitlines()]
    assert only["phase"] == "completed" and only["terminal"]
    assert only == results["first"][1][-1]
    final = operator.RotationStatus(operator_pb2.RotationStatusRequest(), timeout=10)
    assert phase_of(final) == "completed" and final.to_generation == 2
    channel.close()
    # Watchers that left are visible in the log as cancelled streams at most; no errors.
    assert not [e for e in nexus.log_events() if e.get("level") == "error"]
