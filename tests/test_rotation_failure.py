"""A rotation whose store refuses writes mid-way (disk full) ends FAILED, visibly, and resumes.

A real Nexus process, a real SQLite store, a real failure: the rotation is held between two
batches at a test gate (``SPIKE_NEXUS_TEST_GATE_AT``), the test lowers the Nexus process's
RLIMIT_FSIZE to one byte (``prlimit``: every file write of that process now fails with
EFBIG, like a full disk: SQLite answers "disk I/O error", the audit trail cannot append),
and lets the next batch go. Before the fix the worker thread died when it could not save
the failed phase either, and the rotation stayed in ``reencrypt`` with no worker for good:
watchers never ended, status and metrics said "in progress".

Now: the FAILED phase (kind ``store``, the phase it stopped in, the reason) reaches
`spike rotate` and `spike rotation watch` at once, both print it and exit 11; the metrics say
``failed`` / ``store`` / unsaved; `spike rotation resume` is refused while the store is
still full; once the limit is lifted Nexus saves the failure by itself, the resume
continues from the saved cursor and completes, and every version of every secret reads back
byte for byte.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexus.core.testpoints import Point
from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import secrets_pb2, secrets_pb2_grpc
from tests.harness import PY, TEST_PASSWORD, DevAgent, Nexus, pilot, pilot_json, short_tmpdir
from tests.harness import wait_for_nexus as wait_for

PATHS = 240
BATCH = 40
GATE = Point.ROTATION_BETWEEN_BATCHES
FAILED_EXIT = 11
SECRET_WORD = "canary-value-never-in-messages"  # noqa: S105 - a test fixture
# pytest-timeout guards against a hang, not a slow machine: these start real processes
# and must pass under nice -n 19 beside a CPU hog.
pytestmark = pytest.mark.timeout(900)


def expected() -> dict[str, list[dict[str, str]]]:
    out = {f"app/{i % 5}/s{i:04d}": [{"k": f"{SECRET_WORD}-{i}", "u": "\u00e4\u2603\n"}]
           for i in range(PATHS)}
    for j, path in enumerate(sorted(out)[:15]):
        out[path].append({"k": f"{SECRET_WORD}-{path}-2", "pad": "x" * (50 * j)})
    return out


def gate_reached(nexus: Nexus, count: int) -> bool:
    return any(e.get("event") == "test gate reached" and e.get("count") == count
               for e in nexus.log_events())


def stored_rotation(data_dir: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{data_dir / 'spike.db'}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT value FROM state WHERE key = 'rotation'").fetchone()
    finally:
        db.close()
    return json.loads(row[0]) if row else {}


def generations_in_db(data_dir: Path) -> dict[int, int]:
    db = sqlite3.connect(f"file:{data_dir / 'spike.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT generation, count(*) FROM records WHERE blob IS NOT NULL"
                          " GROUP BY generation").fetchall()
    finally:
        db.close()
    return {int(g): int(n) for g, n in rows}


def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class Watcher:
    """A Pilot process that follows the rotation; its lines are collected as they come."""

    def __init__(self, args: list[str], agent: DevAgent, nexus: Nexus) -> None:
        env = agent.env("pilot")
        env["SPIKE_NEXUS_ADDR"] = nexus.address
        self.proc = subprocess.Popen([PY, "-m", "pilot", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def finish(self, timeout: float = 300) -> tuple[int, list[dict[str, Any]], str]:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()
        return code, [json.loads(x) for x in self.lines if x.strip().startswith("{")], self.err


def fsize_limit(pid: int, limit: int) -> None:
    """The soft limit only: the hard one stays, so it can be raised again."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


@pytest.fixture()
def gated(agent: DevAgent, data_dir: Path) -> Iterator[tuple[Nexus, Path]]:
    gate = short_tmpdir("gate-")
    env = agent.env("nexus")
    env["SPIKE_NEXUS_TEST_GATE_AT"] = GATE
    env["SPIKE_NEXUS_TEST_GATE_DIR"] = str(gate)
    nexus = Nexus(data_dir, env, args=["--metrics-listen", "127.0.0.1:0"])
    try:
        yield nexus, gate
    finally:
        (gate / "all").touch()
        with contextlib.suppress(OSError):  # ProcessLookupError: it is gone already
            fsize_limit(nexus.proc.pid, resource.RLIM_INFINITY)
        nexus.stop()
        for child in gate.iterdir():
            child.unlink()
        gate.rmdir()


def read_all(agent: DevAgent, nexus: Nexus) -> dict[str, list[dict[str, str]]]:
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        return {path: [dict(stub.Get(secrets_pb2.GetSecretRequest(path=path, version=v),
                                     timeout=60).data) for v in range(1, len(versions) + 1)]
                for path, versions in expected().items()}
    finally:
        channel.close()


def import_secrets(env: dict[str, str], nexus: Nexus, data_dir: Path) -> int:
    """Init, then every version of ``expected()`` through `spike secret import`; the number
    of records."""
    pilot_json(["init", "--password-stdin", "--output", "json"], env, nexus,
               stdin=TEST_PASSWORD + "\n")
    lines = data_dir / "import.jsonl"
    want = expected()
    lines.write_text("".join(json.dumps({"path": p, "data": d}) + "\n"
                             for depth in range(2) for p, vs in want.items()
                             for d in vs[depth:depth + 1]))
    assert pilot_json(["secret", "import", "--file", str(lines), "--output", "json"],
                      env, nexus)["failed"] == 0
    lines.unlink()
    return sum(len(v) for v in want.values())


def fail_the_third_batch(agent: DevAgent, nexus: Nexus, gate: Path, data_dir: Path
                         ) -> tuple[dict[str, Any], str]:
    """The rotation runs, watched by `spike rotate` itself and by a `rotation watch`; the
    disk is "full" for the third batch. (The saved state before it, everything the watchers
    printed.)"""
    rotate = Watcher(["rotate", "--batch-size", str(BATCH), "--output", "json"], agent, nexus)
    wait_for("gate 1 (one batch written)", lambda: gate_reached(nexus, 1), nexus)
    (gate / "1").touch()
    wait_for("gate 2 (two batches written)", lambda: gate_reached(nexus, 2), nexus)
    watch = Watcher(["rotation", "watch", "--output", "json"], agent, nexus)
    wait_for("the watcher's snapshot", lambda: watch.lines, nexus)
    saved_before = stored_rotation(data_dir)
    assert saved_before["phase"] == "reencrypt" and saved_before["done"] == 2 * BATCH

    # The disk is "full" for Nexus from now on; the third batch's write fails.
    fsize_limit(nexus.proc.pid, 1)
    (gate / "2").touch()

    code, events, err = rotate.finish()
    assert code == FAILED_EXIT, (code, err, "".join(nexus.lines[-30:]))
    last = events[-1]
    assert last["phase"] == "failed" and last["terminal"], last
    assert last["failure_kind"] == "store" and last["failed_in_phase"] == "reencrypt", last
    assert last["failure_unsaved"] is True, last
    assert "spike rotation resume" in last["message"], last
    assert "FAILED during reencrypt (store)" in err and "spike rotation resume" in err, err
    assert "Traceback" not in err
    wcode, wevents, werr = watch.finish()
    assert wcode == FAILED_EXIT and wevents[-1] == last, (wcode, werr)
    assert [e for e in events if e["terminal"]] == [last]
    return saved_before, err + werr + json.dumps(events)


def check_failed_and_refusing(env: dict[str, str], nexus: Nexus, data_dir: Path,
                              metrics: str) -> None:
    """Status and metrics tell the truth, although the store still says "reencrypt"; resume
    and a new rotation are refused while the disk is full."""
    status = pilot_json(["rotation", "status", "--output", "json"], env, nexus)
    assert status["phase"] == "failed" and status["failure_unsaved"] is True, status
    assert stored_rotation(data_dir)["phase"] == "reencrypt"
    samples = scrape(metrics)
    assert metric(samples, "spike_nexus_rotation_phase", phase="failed") == 1
    assert metric(samples, "spike_nexus_rotation_phase", phase="reencrypt") == 0
    assert metric(samples, "spike_nexus_rotation_failure", kind="store") == 1
    assert metric(samples, "spike_nexus_rotation_failure", kind="internal") == 0
    assert metric(samples, "spike_nexus_rotation_failure_unsaved") == 1
    assert metric(samples, "spike_nexus_rotation_orphaned") == 0
    assert metric(samples, "spike_nexus_rotation_in_progress") == 0
    assert (metric(samples, "spike_nexus_rotation_failures_total") or 0) >= 1

    # Resume while the disk is still full: refused clearly, nothing changes.
    refused = pilot(["rotation", "resume", "--detach"], env, nexus)
    assert refused.returncode != 0 and "store" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and "INTERNAL" not in refused.stderr
    assert pilot_json(["rotation", "status", "--output", "json"], env, nexus)["phase"] == "failed"
    # A new rotation is refused too (the failed one must be resolved first).
    again = pilot(["rotate", "--detach"], env, nexus)
    assert again.returncode == 7, again.stderr


def test_disk_full_mid_rotation_fails_visibly_then_resumes_without_loss(
        agent: DevAgent, data_dir: Path, gated: tuple[Nexus, Path]) -> None:
    nexus, gate = gated
    env = agent.env("pilot")
    metrics = next(str(e["address"]) for e in nexus.log_events()
                   if e.get("event") == "metrics listening")
    records = import_secrets(env, nexus, data_dir)
    saved_before, printed = fail_the_third_batch(agent, nexus, gate, data_dir)
    check_failed_and_refusing(env, nexus, data_dir, metrics)

    # The cause is fixed: Nexus saves the failure by itself.
    fsize_limit(nexus.proc.pid, resource.RLIM_INFINITY)
    saved = wait_for("the failure saved in the store",
                     lambda: (s := stored_rotation(data_dir))["phase"] == "failed" and s, nexus)
    assert saved["failure_kind"] == "store" and saved["failure_unsaved"] is False
    assert saved["cursor"] == saved_before["cursor"]  # progress up to the failure is kept
    assert metric(scrape(metrics), "spike_nexus_rotation_failure_unsaved") == 0
    assert generations_in_db(data_dir) == {1: records - 2 * BATCH, 2: 2 * BATCH}

    # Resume continues from the saved cursor and completes.
    (gate / "all").touch()
    resumed = pilot(["rotation", "resume", "--output", "json"], env, nexus)
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    final = [json.loads(x) for x in resumed.stdout.splitlines() if x.strip()][-1]
    assert final["phase"] == "completed" and final["to_generation"] == 2, final
    assert generations_in_db(data_dir) == {2: records}
    assert read_all(agent, nexus) == expected()
    samples = scrape(metrics)
    assert metric(samples, "spike_nexus_rotation_phase", phase="completed") == 1
    assert metric(samples, "spike_nexus_rotation_failure", kind="store") == 0

    # The audit trail got the failure once the disk had room again; no value leaked.
    audit = (data_dir / "audit.jsonl").read_text()
    assert '"rotation.failed"' in audit and '"rotation.completed"' in audit
    assert SECRET_WORD not in audit
    assert not any(SECRET_WORD in line for line in nexus.lines)
    assert SECRET_WORD not in printed
