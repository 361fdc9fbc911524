"""Unauthenticated connections cannot starve real clients (issue: idle connections).

Real Nexus processes with a small open-file limit, flooded with idle TCP sockets that never
start TLS. Nothing here waits a number of seconds: the test waits for the server to close
the idle sockets (an event), with a deadline far above the configured handshake timeout.
"""

from __future__ import annotations

import json
import resource
import socket
import time
from pathlib import Path

from tests.harness import DevAgent, Nexus, pilot


def limit_open_files(soft: int, hard: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


def listening_event(nexus: Nexus) -> dict[str, object]:
    return next(e for e in nexus.log_events() if e.get("event") == "nexus listening")


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_the_open_file_limit_is_raised_to_the_hard_limit(agent: DevAgent, data_dir: Path) -> None:
    nexus = Nexus(data_dir, agent.env("nexus"), preexec_fn=limit_open_files(256, 1024))
    try:
        assert open_files_limit(nexus.proc.pid) == (1024, 1024)
        event = listening_event(nexus)
        assert event["open_files"] == 1024
        assert event["max_connections"] == 1024 - 128
    finally:
        nexus.stop()


def wait_closed_by_peer(sockets: list[socket.socket], deadline: float) -> list[socket.socket]:
    """Wait until the server has closed each socket; return those still open at the deadline."""
    open_ones = list(sockets)
    for sock in open_ones:
        sock.setblocking(False)
    while open_ones and time.monotonic() < deadline:
        still = []
        for sock in open_ones:
            try:
                if sock.recv(64) != b"":
                    still.append(sock)  # the server wrote something: not expected, keep it
            except BlockingIOError:
                still.append(sock)
            except OSError:
                pass  # reset by the server: closed
        open_ones = still
        if open_ones:
            time.sleep(0.05)
    return open_ones


def test_idle_sockets_do_not_starve_a_real_client(agent: DevAgent, data_dir: Path) -> None:
    """300 idle sockets against a 256-descriptor Nexus: they are shed, Pilot gets through."""
    nexus = Nexus(data_dir, agent.env("nexus"), args=["--handshake-timeout-seconds", "1"],
                  preexec_fn=limit_open_files(256, 256))
    host, port = nexus.address.rsplit(":", 1)
    flood: list[socket.socket] = []
    try:
        assert listening_event(nexus)["max_connections"] == 256 - 128
        for _ in range(300):
            flood.append(socket.create_connection((host, int(port)), timeout=10))
        # Every idle socket is closed by the server: at once beyond the cap, after the
        # handshake timeout within it. The deadline only bounds a failing run.
        left = wait_closed_by_peer(flood, time.monotonic() + 90)
        assert not left, f"{len(left)} idle sockets still held by Nexus"
        result = pilot(["status", "--output", "json"], agent.env("pilot"), nexus, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1])["state"] == "uninitialized"
    finally:
        for sock in flood:
            sock.close()
        nexus.stop()
