"""Several watchers of one rotation: real Pilot processes with --output json and a raw stream.

Two watchers attach at the start, one attaches late, one is killed mid-way and a raw gRPC
stream is cancelled after a few events. Every complete watcher sees a strictly increasing
sequence, progress that never goes back within a phase, identical events for the same
sequence number, and exactly one terminal event, last. The rotation completes regardless of
the watchers that left.

Nothing here depends on timing: the rotation is held between batches at a test gate
(``SPIKE_NEXUS_TEST_GATE_AT``, see nexus/core/testpoints.py) and moves on only when the test
lets it, so the late watcher always attaches mid-re-encryption, however loaded the machine
(it once attached after the end on a busy one).
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import operator_pb2, operator_pb2_grpc
from tests.harness import PY, TEST_PASSWORD, DevAgent, Nexus, pilot, pilot_json
from tests.harness import wait_for_nexus as wait_for

RECORDS = 400
BATCH = 20
# pytest-timeout guards against a hang, not a slow machine: these start real processes
# and must pass under nice -n 19 beside a CPU hog.
pytestmark = pytest.mark.timeout(900)


class Watcher:
    """`spike rotation watch --output json` as a real process; lines collected as they come."""

    def __init__(self, agent: DevAgent, nexus: Nexus) -> None:
        env = agent.env("pilot")
        env["SPIKE_NEXUS_ADDR"] = nexus.address
        self.proc = subprocess.Popen([PY, "-m", "pilot", "rotation", "watch", "--output",
                                      "json"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def finish(self, timeout: float = 180) -> tuple[int, list[dict[str, Any]], str]:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        return code, [json.loads(line) for line in self.lines if line.strip()], err


def gate_reached(nexus: Nexus, count: int) -> bool:
    return any(e.get("event") == "test gate reached" and e.get("count") == count
               for e in nexus.log_events())


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


def check_same_events(results: dict[str, tuple[int, list[dict[str, Any]], str]]) -> None:
    """Each watcher ended well with a sound stream, and every watcher saw the same state
    under the same sequence number."""
    by_sequence: dict[int, dict[str, Any]] = {}
    for name, (code, events, err) in results.items():
        assert code == 0, (name, err)
        check_stream(events)
        for event in events:
            assert by_sequence.setdefault(event["sequence"], event) == event, name


def phase_of(event: Any) -> str:
    return operator_pb2.RotationPhase.Name(event.phase).removeprefix("ROTATION_PHASE_").lower()


def test_two_watchers_a_late_one_and_leavers(agent: DevAgent, data_dir: Path,
                                             gated: tuple[Nexus, Path]) -> None:
    nexus, gate = gated
    env = agent.env("pilot")
    pilot_json(["init", "--password-stdin", "--output", "json"], env, nexus,
               stdin=TEST_PASSWORD + "\n")
    lines = data_dir / "import.jsonl"
    lines.write_text("".join(json.dumps({"path": f"w/{i:04d}", "data": {"i": str(i)}}) + "\n"
                             for i in range(RECORDS)))
    pilot_json(["secret", "import", "--file", str(lines), "--output", "json"], env, nexus)

    # Nothing to watch yet: a clear answer, exit 1.
    idle = pilot(["rotation", "watch", "--output", "json"], env, nexus)
    assert idle.returncode == 1 and json.loads(idle.stdout)["phase"] == "idle"

    pilot_json(["rotate", "--detach", "--batch-size", str(BATCH), "--output", "json"],
               env, nexus)
    # Held after the first batch: three watchers attach and get their snapshot.
    wait_for("first batch held at the gate", lambda: gate_reached(nexus, 1), nexus)
    first, second, leaver = (Watcher(agent, nexus) for _ in range(3))
    for watcher in (first, second, leaver):
        wait_for("watcher snapshot", lambda w=watcher: w.lines, nexus)  # type: ignore[misc]
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    operator = operator_pb2_grpc.OperatorStub(channel)
    raw = operator.WatchRotation(operator_pb2.WatchRotationRequest())
    raw_events: list[operator_pb2.RotationEvent] = []
    for raw_event in raw:
        raw_events.append(raw_event)
        if len(raw_events) == 3:
            raw.cancel()  # type: ignore[no-untyped-call]  # a client that goes away mid-stream
            break
        # Let exactly one more batch through: the next event is its progress.
        (gate / str(len(raw_events))).touch()
    assert [e.sequence for e in raw_events] == sorted({e.sequence for e in raw_events})
    assert [e.done for e in raw_events] == [BATCH, 2 * BATCH, 3 * BATCH]

    # Still held (after the third batch): the late watcher attaches mid-re-encryption.
    wait_for("third batch held at the gate", lambda: gate_reached(nexus, 3), nexus)
    status = pilot_json(["rotation", "status", "--output", "json"], env, nexus)
    assert not status["terminal"] and status["phase"] == "reencrypt", status
    late = Watcher(agent, nexus)
    wait_for("late watcher snapshot", lambda: late.lines, nexus)
    wait_for("the leaver's progress", lambda: len(leaver.lines) >= 3, nexus)
    leaver.proc.send_signal(signal.SIGKILL)  # a Pilot that dies mid-watch
    leaver.proc.wait(60)
    (gate / "all").touch()  # now let the rotation run to its end

    results = {name: watcher.finish() for name, watcher in
               (("first", first), ("second", second), ("late", late))}
    check_same_events(results)
    assert results["late"][1][0]["sequence"] > results["first"][1][0]["sequence"]
    assert results["late"][1][0]["done"] > 0  # its snapshot shows progress made so far
    assert results["first"][1][-1]["done"] == RECORDS
    assert results["late"][1][0]["done"] == 3 * BATCH
    assert any(e["phase"] == "reencrypt" for e in results["late"][1])

    # The rotation finished although watchers left; a watcher attaching now gets the
    # terminal snapshot and exits 0.
    after = pilot(["rotation", "watch", "--output", "json"], env, nexus)
    assert after.returncode == 0
    (only,) = [json.loads(line) for line in after.stdout.splitlines()]
    assert only["phase"] == "completed" and only["terminal"]
    assert only == results["first"][1][-1]
    final = operator.RotationStatus(operator_pb2.RotationStatusRequest(), timeout=60)
    assert phase_of(final) == "completed" and final.to_generation == 2
    channel.close()
    # Watchers that left are visible in the log as cancelled streams at most; no errors.
    assert not [e for e in nexus.log_events() if e.get("level") == "error"]
