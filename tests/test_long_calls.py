"""Pilot's long calls outlive Nexus closing connections by age (--max-connection-age-seconds 5):
`spike secret import` retries a line whose call a closed connection cut, and `spike rotation
watch` resumes a cut stream with neither a gap nor a repeated event. Each test runs across
several connection ages by construction (it keeps going for a duration), and asserts outcomes,
not timings."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from pilot.client import NexusClient
from pilot.commands.rotation import ResumingWatch
from pilot.errors import PilotError
from spike.client import transient
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
    # A short grace, so a stream is cut soon after its connection's age (5 s) is reached.
    server = Nexus(data_dir, env, args=[*AGE, "--max-connection-age-grace-seconds", "1"])
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
        env_watch = agent.env("pilot") | {"SPIKE_NEXUS_ADDR": server.address,
                                          "SPIKE_DEBUG": "1"}
        watcher = subprocess.Popen([PY, "-m", "pilot", "rotation", "watch", "--output", "json"],
                                   env=env_watch, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        errors: list[str] = []
        stderr = watcher.stderr
        assert stderr is not None
        reader = threading.Thread(target=lambda: errors.extend(iter(stderr.readline, "")),
                                  daemon=True)
        reader.start()

        def resumes() -> int:
            return sum("rotation watch: the stream was cut" in line for line in errors)

        def resumed(count: int) -> bool:
            return resumes() >= count

        # Held batch by batch; each gate stays shut until the watch has been cut by
        # connection age (and resumed) once more, so it is cut at least three times.
        for batch in range(1, 4):
            wait_for_nexus("test gate reached", partial(gate_reached, server, batch), server)
            wait_for_nexus(f"resume {batch} of the watch", partial(resumed, batch), server)
            (gate / str(batch)).touch()
        (gate / "all").touch()
        assert watcher.stdout is not None
        out = watcher.stdout.read()  # to its end: the watch has exited
        watcher.wait(timeout=600)
        reader.join(timeout=60)
        assert watcher.returncode == 0, "".join(errors)
        assert resumes() >= 3, "".join(errors)
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


# ----------------------------------------- the retry decisions, with a connection cut on cue


class Cut(grpc.RpcError):
    """What grpcio raises when the connection closed under a call (no Nexus answer)."""

    def __init__(self, detail: str = "Socket closed",
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._detail, self._code = detail, code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._detail

    def trailing_metadata(self) -> Any:
        return ()


def test_transient_is_a_cut_connection_not_an_answer() -> None:
    assert transient(Cut())
    assert transient(Cut("GOAWAY received", grpc.StatusCode.INTERNAL))
    assert transient(Cut("max connection age"))
    assert not transient(Cut("no such secret", grpc.StatusCode.NOT_FOUND))


def test_import_call_retries_a_put_cut_by_the_connection() -> None:
    calls = []

    def put(request: str, timeout: float, wait_for_ready: bool) -> str:
        calls.append(request)
        if len(calls) < 3:
            raise Cut()
        return "ok"

    client = NexusClient("127.0.0.1:1")
    assert client.call(cast(Any, put), "req", retry=True) == "ok"
    assert calls == ["req"] * 3
    calls.clear()
    with pytest.raises(PilotError):  # without retry: once, as before
        client.call(cast(Any, put), "req")
    assert calls == ["req"]


def test_watch_resumes_without_gap_or_repeat() -> None:
    from spike.v1 import operator_pb2 as pb

    def event(sequence: int) -> pb.RotationEvent:
        return pb.RotationEvent(rotation_id="r1", sequence=sequence)

    requests: list[str] = []
    streams: list[list[Any]] = [[event(1), event(2), Cut()], [event(2), event(3), Cut()],
                                [event(3), event(4), event(4), event(5)]]

    class Stream:
        def __init__(self, items: list[Any]) -> None:
            self.items = items

        def __iter__(self) -> Iterator[pb.RotationEvent]:
            for item in self.items:
                if isinstance(item, Exception):
                    raise item
                yield item

        def cancel(self) -> None:
            pass

    class Operator:
        def WatchRotation(self, request: pb.WatchRotationRequest) -> Stream:
            requests.append(request.rotation_id)
            return Stream(streams[len(requests) - 1])

    fake = SimpleNamespace(operator=Operator())
    seen = [e.sequence for e in ResumingWatch(cast(Any, fake), "")]
    # Resumed twice, on the same rotation; a keep-alive repeat (4, 4) is left as it was.
    assert seen == [1, 2, 3, 4, 4, 5]
    assert requests == ["", "r1", "r1"]
