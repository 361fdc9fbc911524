"""Two Nexus nodes sharing one PostgreSQL store follow each other's rotations by themselves.

Node B starts after init and unseals with the password alone (the store keeps the sealed
backup). Node A rotates; B takes the new generation from the keyring of record (wrapped under
the one it holds) with no operator: its reads and writes keep working during the rotation, its
writes move to the new generation, and it forgets the old one when A retires it. The rotation's
re-encryption is held at a gate (no timing): B is checked while A is mid-rotation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.harness import (
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    eventually,
    pilot,
    pilot_json,
    short_tmpdir,
)

PW = TEST_PASSWORD + "\n"
# A lease far longer than any test step: on a loaded machine no node counts as gone, and no
# finalize stops waiting for a node, because a heartbeat came late.
LEASE = ["--node-lease-seconds", "300"]


def _cleanup(gate: Path, nodes: list[Nexus | None], dirs: list[Path]) -> None:
    (gate / "all").touch()
    for node in nodes:
        if node is not None:
            node.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _generations(agent: DevAgent, node: Nexus) -> dict[str, Any]:
    return pilot_json(["status", "--output", "json"], agent.env("pilot"), node)


def _check_node_list(agent: DevAgent, a: Nexus, b: Nexus, status: dict[str, Any]) -> None:
    """Both nodes report themselves in the store: spike status on either lists both; a
    stopped node says so at once."""
    nodes = {n["address"]: n for n in status["nodes"]}
    assert set(nodes) == {a.address, b.address}
    assert all(n["live"] and n["root_key_generation"] == 2 and n["generations"] == [2]
               for n in nodes.values())
    assert status["node"] == nodes[b.address]["node"]
    text = pilot(["status"], agent.env("pilot"), b).stdout
    assert "(this node)" in text and a.address in text
    a.stop()
    stopped = {n["address"]: n for n in _generations(agent, b)["nodes"]}
    assert stopped[a.address]["state"] == "stopped" and not stopped[a.address]["live"]


def test_a_node_follows_another_nodes_rotation_without_an_operator(agent: DevAgent,
                                                                   pg_dsn: str) -> None:
    su = agent.env("pilot")
    dirs = [short_tmpdir("mn-a-"), short_tmpdir("mn-b-"), short_tmpdir("mn-g-")]
    gate = dirs[2]
    args = ["--store", "postgres", "--dsn", pg_dsn, *LEASE]
    env_a = agent.env("nexus") | {"SPIKE_NEXUS_TEST_GATE_AT": "rotation_between_batches",
                                  "SPIKE_NEXUS_TEST_GATE_DIR": str(gate)}
    a = Nexus(dirs[0], env_a, args=args)
    b: Nexus | None = None
    try:
        assert pilot(["init", "--password-stdin"], su, a, stdin=PW).returncode == 0
        # Node B shares the store and has no backup file: the store's copy opens.
        b = Nexus(dirs[1], agent.env("nexus"), args=args)
        recovered = pilot(["recover", "--password-stdin"], su, b, stdin=PW)
        assert recovered.returncode == 0, recovered.stderr
        assert (dirs[1] / "root-key.backup").read_bytes() == (
            dirs[0] / "root-key.backup").read_bytes()
        for i in range(20):
            assert pilot(["secret", "put", f"shared/s{i}", f"v=value-{i}"], su,
                         a if i % 2 else b).returncode == 0

        started = pilot(["rotate", "--detach", "--output", "json", "--emergency",
                         "--batch-size", "5"], su, a)
        assert started.returncode == 0, started.stderr
        # A holds after its first batch: generation 2 is recorded, 1 is still in use.
        eventually(lambda: any(e.get("event") == "test gate reached"
                               for e in a.log_events()), "A at the gate")
        # B catches up on its own (the follower, or the first write that meets generation 2).
        put = pilot(["secret", "put", "shared/during", "v=during"], su, b)
        assert put.returncode == 0, put.stderr
        for i in range(20):
            got = pilot_json(["secret", "get", f"shared/s{i}", "--output", "json"], su, b)
            assert got["data"] == {"v": f"value-{i}"}
        assert _generations(agent, b)["root_key_generation"] == 2

        (gate / "all").touch()
        eventually(lambda: _generations(agent, a)["rotation"]["phase"] == "completed",
                   "the rotation completed")
        # A retired generation 1: B forgets it too, and its file is the store's backup again.
        eventually(lambda: _generations(agent, b)["backup"]["generations"] == [2],
                   "B's backup holds only generation 2")
        assert (dirs[1] / "root-key.backup").read_bytes() == (
            dirs[0] / "root-key.backup").read_bytes()
        assert pilot(["secret", "put", "shared/after", "v=x"], su, b).returncode == 0
        for path, value in (("shared/during", "during"), ("shared/after", "x")):
            got = pilot_json(["secret", "get", path, "--output", "json"], su, a)
            assert got["data"] == {"v": value}
        status = _generations(agent, b)
        assert status["root_key_generation"] == 2
        assert set(status["records_by_generation"]) == {"2"}
        _check_node_list(agent, a, b, status)
        events = [e.get("event") for e in b.log_events()]
        assert "root key generation taken from the keyring of record" in events
        assert "root key generation retired by another node: forgotten" in events
        assert json.dumps(events)  # the log is JSON lines
    finally:
        _cleanup(gate, [a, b], dirs)


def test_finalize_waits_for_a_node_that_has_not_taken_the_new_generation(
        agent: DevAgent, pg_dsn: str) -> None:
    """Node B is held (a test gate) just before it takes generation 2 from the keyring of
    record: A's rotation re-encrypts everything but does not drop generation 1 while B's
    heartbeat still says 1. Released, B takes 2 and A finishes."""
    su = agent.env("pilot")
    dirs = [short_tmpdir("mf-a-"), short_tmpdir("mf-b-"), short_tmpdir("mf-g-")]
    gate = dirs[2]
    args = ["--store", "postgres", "--dsn", pg_dsn, *LEASE]
    a = Nexus(dirs[0], agent.env("nexus"), args=args)
    env_b = agent.env("nexus") | {"SPIKE_NEXUS_TEST_GATE_AT": "keyring_follow",
                                  "SPIKE_NEXUS_TEST_GATE_DIR": str(gate)}
    b: Nexus | None = None
    try:
        assert pilot(["init", "--password-stdin"], su, a, stdin=PW).returncode == 0
        b = Nexus(dirs[1], env_b, args=args)
        assert pilot(["recover", "--password-stdin"], su, b, stdin=PW).returncode == 0
        for i in range(10):
            assert pilot(["secret", "put", f"f/s{i}", f"v={i}"], su, a).returncode == 0
        started = pilot(["rotate", "--detach", "--emergency"], su, a)
        assert started.returncode == 0, started.stderr
        held = b
        eventually(lambda: any(e.get("event") == "test gate reached"
                               for e in held.log_events()), "B held before taking 2")
        eventually(lambda: any(e.get("event") == "waiting for the other nodes to write under "
                               "the new generation" and e.get("nodes")
                               for e in a.log_events()), "A's finalize waiting for B")
        status = _generations(agent, a)
        assert status["rotation"]["phase"] == "finalize"
        assert status["backup"]["generations"] == [1, 2]  # generation 1 not dropped yet
        (gate / "all").touch()
        eventually(lambda: _generations(agent, a)["rotation"]["phase"] == "completed",
                   "the rotation completed once B caught up")
        eventually(lambda: _generations(agent, b)["backup"]["generations"] == [2],
                   "B follows the retirement")
        assert _generations(agent, b)["root_key_generation"] == 2
        got = pilot_json(["secret", "get", "f/s3", "--output", "json"], su, b)
        assert got["data"] == {"v": "3"}
    finally:
        _cleanup(gate, [a, b], dirs)
