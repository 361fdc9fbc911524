"""Pilot's long calls outlive Nexus closing connections by age (--max-connection-age-seconds 5):
`spike secret import` retries a line whose call a closed connection cut, and `spike rotation
watch` resumes a cut stream with neither a gap nor a repeated event. Each test runs across
several connection ages by construction (it keeps going for a duration), and asserts outcomes,
not timings."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import GATE
from tests.harness import (
    PY,
    ROOT,
    DevAgent,
    Nexus,
    pilot,
    pilot_json,
    short_tmpdir,
    start_unsealed,
    wait_for_nexus,
)

AGE = ["--max-connection-age-seconds", "5"]


@pytest.fixture()
def aged(agent: DevAgent) -> Iterator[Nexus]:
    data_dir = short_tmpdir("nxa-")
    running = start_unsealed(agent, data_dir, AGE)
    yield running
    running.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def gate_reached(server: Nexus, count: int) -> bool:
    return any(e.get("event") == "test gate reached" and e.get("count") == count
               for e in server.log_events())


def spike_process(agent: DevAgent, server: Nexus, *args: str) -> subprocess.Popen[str]:
    env = agent.env("pilot") | {"SPIKE_NEXUS_ADDR": server.address}
    return subprocess.Popen([PY, "-m", "pilot", *args], env=env, cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_import_outlives_connection_age(agent: DevAgent, aged: Nexus) -> None:
    importer = spike_process(agent, aged, "secret", "import", "--file", "-",
                             "--output", "json")
    assert importer.stdin is not None
    lines = 0
    began = time.monotonic()
    # Four connection ages of lines, fed as the import goes.
    while time.monotonic() - began < 20 or lines < 200:
        importer.stdin.write(json.dumps({"path": f"imp/{lines:06d}",
                                         "data": {"v": str(lines)}}) + "\n")
        importer.stdin.flush()
        lines += 1
        time.sleep(0.005)
    out, err = importer.communicate(timeout=600)
    assert importer.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"imported": lines, "failed": 0}
    listed = pilot_json(["secret", "list", "imp/", "--output", "json"], agent.env("pilot"),
                        aged)
    assert listed["paths"] == [f"imp/{i:06d}" for i in range(lines)]


def test_rotation_watch_resumes_a_stream_cut_by_age(agent: DevAgent, tmp: Path) -> None:
    data_dir = short_tmpdir("nxw-")
    gate = short_tmpdir("gate-")
    env = agent.env("nexus") | {"SPIKE_NEXUS_TEST_GATE_AT": GATE,
                                "SPIKE_NEXUS_TEST_GATE_DIR": str(gate)}
    server = Nexus(data_dir, env, args=AGE)
    watcher: subprocess.Popen[str] | None = None
    try:
        result = pilot(["init", "--password-stdin"], agent.env("pilot"), server,
                       stdin="correct horse battery staple orbit\n")
        assert result.returncode == 0, result.stderr
        for i in range(6):
            assert pilot(["secret", "put", f"w/{i}", "v=x"], agent.env("pilot"),
                         server).returncode == 0
        pilot_json(["rotate", "--detach", "--batch-size", "1", "--output", "json"],
                   agent.env("pilot"), server)
        watcher = spike_process(agent, server, "rotation", "watch", "--output", "json")
        # Held batch by batch; each gate stays shut past a connection age plus Nexus's
        # 30 s grace, so the watch stream is cut by age between batches.
        for batch in range(1, 4):
            wait_for_nexus("test gate reached", partial(gate_reached, server, batch), server)
            time.sleep(20)
            (gate / str(batch)).touch()
        (gate / "all").touch()
        out, err = watcher.communicate(timeout=600)
        assert watcher.returncode == 0, err
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        sequences = [e["sequence"] for e in events]
        assert sequences == sorted(set(sequences)), sequences  # no repeat, in order
        assert events[-1]["phase"] == "completed"
        done = [e["done"] for e in events if e["phase"] == "reencrypt"]
        assert done == sorted(done)
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        (gate / "all").touch()
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(gate, ignore_errors=True)
