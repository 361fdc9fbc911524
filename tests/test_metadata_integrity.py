"""Plaintext metadata tampered in the real SQLite file (issue 11, item 16).

Before: an ``oldest_version`` above the current version made the next put delete every
version; a missing ``secret_meta`` row made every put to that path INTERNAL; one wrong
``generation`` cell made `spike recover` refuse every backup ("the backup lacks
generation(s) [7]"). Now inconsistent metadata is refused with a distinct integrity error
and nothing is deleted, and the ciphertext header (which carries its generation) is the
truth: recovery and rotation work, and the wrong cell is logged and set right.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import secrets_pb2, secrets_pb2_grpc
from tests.harness import (
    DevAgent,
    Nexus,
    RestartableNexus,
    audit_events,
    get_data,
    pilot,
    pilot_json,
    put,
    start_unsealed,
    writer,
)


@pytest.fixture()
def node(agent: DevAgent) -> Iterator[RestartableNexus]:
    running = RestartableNexus(agent)
    yield running
    running.nexus.stop()
    shutil.rmtree(running.data_dir, ignore_errors=True)


def stored_versions(data_dir: Path, path: str) -> list[int]:
    with sqlite3.connect(f"file:{data_dir / 'spike.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT version FROM records WHERE kind = 'secret' AND path = ? "
                            "ORDER BY version", (path,)).fetchall()
    return [int(r[0]) for r in rows]


def cells_and_headers(data_dir: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(f"file:{data_dir / 'spike.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT path, generation, blob FROM records WHERE blob IS NOT NULL "
                            "ORDER BY kind, path, version").fetchall()
    return [(str(p), int(g), int.from_bytes(bytes(b)[1:5], "big")) for p, g, b in rows]


def raw_put(agent: DevAgent, server: Nexus, path: str) -> grpc.RpcError:
    channel = client_channel(server.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Put(secrets_pb2.PutSecretRequest(path=path, data={"k": "raw"}), timeout=10)
        return info.value
    finally:
        channel.close()


def refused(agent: DevAgent, server: Nexus, path: str) -> str:
    """A put to ``path`` is refused with the metadata integrity error, never INTERNAL."""
    result = pilot(["secret", "put", path, "k=new"], agent.env("pilot"), server)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "contradicts its stored versions" in result.stderr, result.stderr
    assert "INTERNAL" not in result.stderr and "Traceback" not in result.stderr
    err = raw_put(agent, server, path)
    assert err.code() == grpc.StatusCode.DATA_LOSS, (err.code(), err.details())
    kinds = [str(m.value) for m in (err.trailing_metadata() or ()) if m.key == "spike-error-kind"]
    assert kinds == ["metadata_integrity"], kinds
    return result.stderr


def test_oldest_above_current_is_refused_and_deletes_nothing(agent: DevAgent,
                                                             node: RestartableNexus) -> None:
    server = node.nexus
    for i in (1, 2, 3):
        put(agent, server, "m/oldest", f"k=v{i}")
    put(agent, server, "m/other", "k=fine")
    assert server.stop() == 0
    conn = writer(node.data_dir)
    try:
        conn.execute("UPDATE secret_meta SET oldest_version = 99 WHERE path = 'm/oldest'")
    finally:
        conn.close()
    server = node.restart()

    message = refused(agent, server, "m/oldest")
    assert "oldest retained version (99) is above the current one (3)" in message
    # Nothing was deleted: every version is still stored and readable.
    assert stored_versions(node.data_dir, "m/oldest") == [1, 2, 3]
    for i in (1, 2, 3):
        assert get_data(agent, server, "m/oldest", i) == {"k": f"v{i}"}
    # Metadata refuses the same way; other paths are untouched.
    meta = pilot(["secret", "metadata", "m/oldest"], agent.env("pilot"), server)
    assert meta.returncode == 1 and "contradicts its stored versions" in meta.stderr
    assert put(agent, server, "m/other", "k=still") == 2
    # Logged, and audited with its own outcome.
    assert any(e.get("event") == "secret metadata inconsistent" and e.get("path") == "m/oldest"
               for e in server.log_events())
    def audited() -> bool:
        return any(e.get("action") == "secret.put" and e.get("target") == "m/oldest"
                   and e.get("outcome") == "metadata_integrity"
                   for e in audit_events(node.data_dir))

    deadline = time.monotonic() + 30
    while not audited():  # a non-durable line: wait for it to be written
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_missing_metadata_row_is_refused_not_internal(agent: DevAgent,
                                                      node: RestartableNexus) -> None:
    server = node.nexus
    put(agent, server, "m/lost", "k=v1")
    put(agent, server, "m/lost", "k=v2")
    assert server.stop() == 0
    conn = writer(node.data_dir)
    try:
        conn.execute("DELETE FROM secret_meta WHERE path = 'm/lost'")
    finally:
        conn.close()
    server = node.restart()

    message = refused(agent, server, "m/lost")
    assert "versions up to 2 are stored but the path has no metadata" in message
    assert stored_versions(node.data_dir, "m/lost") == [1, 2]
    assert get_data(agent, server, "m/lost", 2) == {"k": "v2"}


def test_current_below_stored_versions_is_refused(agent: DevAgent,
                                                  node: RestartableNexus) -> None:
    server = node.nexus
    for i in (1, 2, 3):
        put(agent, server, "m/behind", f"k=v{i}")
    assert server.stop() == 0
    conn = writer(node.data_dir)
    try:
        conn.execute("UPDATE secret_meta SET current_version = 1 WHERE path = 'm/behind'")
    finally:
        conn.close()
    server = node.restart()
    message = refused(agent, server, "m/behind")
    assert "version 3 is stored but the metadata says the current version is 1" in message
    assert stored_versions(node.data_dir, "m/behind") == [1, 2, 3]


def test_impossible_timestamps_are_left_out_not_internal(agent: DevAgent,
                                                         node: RestartableNexus) -> None:
    server = node.nexus
    put(agent, server, "m/time", "k=v1")
    assert server.stop() == 0
    conn = writer(node.data_dir)
    try:
        conn.execute("UPDATE records SET created_at = 1e300 WHERE path = 'm/time'")
        conn.execute("UPDATE secret_meta SET created_at = -5, updated_at = 1e300 "
                     "WHERE path = 'm/time'")
    finally:
        conn.close()
    server = node.restart()
    assert get_data(agent, server, "m/time") == {"k": "v1"}
    meta = pilot_json(["secret", "metadata", "m/time", "--output", "json"],
                      agent.env("pilot"), server)
    assert meta["created"] is None and meta["updated"] is None
    assert meta["versions"][0]["created"] is None
    assert any(e.get("event") == "stored timestamp out of range; left out"
               for e in server.log_events())


def test_wrong_generation_cells_recover_and_rotate(agent: DevAgent,
                                                   node: RestartableNexus) -> None:
    server = node.nexus
    pilot_json(["policy", "put", "gp", "--spiffe-id-pattern",
                "spiffe://spike\\.internal/workload/demo", "--path-pattern", "g/.*",
                "--permissions", "read", "--output", "json"], agent.env("pilot"), server)
    for name in ("seven", "two", "plain"):
        put(agent, server, f"g/{name}", f"k={name}")
    assert server.stop() == 0
    conn = writer(node.data_dir)
    try:
        # A generation that never existed, and the one the next rotation will create.
        conn.execute("UPDATE records SET generation = 7 WHERE path = 'g/seven'")
        conn.execute("UPDATE records SET generation = 2 WHERE path = 'g/two'")
        conn.execute("UPDATE records SET generation = 9 WHERE kind = 'policy'")
    finally:
        conn.close()

    # Recovery works with the one backup there is (before: "the backup lacks
    # generation(s) [2, 7, 9] that stored records still need").
    server = node.restart()
    for name in ("seven", "two", "plain"):
        assert get_data(agent, server, f"g/{name}") == {"k": name}
    assert pilot(["secret", "get", "g/seven"], agent.env("workload"), server).returncode == 0
    # Each wrong cell was logged and set back to the generation its header names.
    wrong = [e for e in server.log_events()
             if e.get("event") == "generation cell disagrees with the ciphertext header"]
    assert sorted((e["path"], e["cell"], e["header"]) for e in wrong) == [
        ("g/seven", 7, 1), ("g/two", 2, 1), ("gp", 9, 1)]
    assert all(cell == header == 1 for _, cell, header in cells_and_headers(node.data_dir))
    # And audited (durable: the line is in the trail once recover has answered).
    repaired = [e for e in audit_events(node.data_dir)
                if e.get("action") == "store.generation_cells"]
    assert len(repaired) == 1, repaired
    assert repaired[0]["outcome"] == "repaired"
    assert repaired[0]["detail"]["mismatched"] == 3 and repaired[0]["detail"]["fixed"] == 3

    # A rotation completes and re-encrypts every record, the tampered ones included.
    rotated = pilot(["rotate", "--output", "json"], agent.env("pilot"), server, timeout=300)
    assert rotated.returncode == 0, rotated.stderr
    assert all(cell == header == 2 for _, cell, header in cells_and_headers(node.data_dir))
    for name in ("seven", "two", "plain"):
        assert get_data(agent, server, f"g/{name}") == {"k": name}

    # And the store stays recoverable after a restart (the backup now holds generation 2).
    assert server.stop() == 0
    server = node.restart()
    assert get_data(agent, server, "g/two") == {"k": "two"}


def test_a_wrong_cell_naming_a_foreign_header_is_reported(agent: DevAgent,
                                                          node: RestartableNexus) -> None:
    """A record whose *header* was rewritten to a generation that never existed cannot be
    decrypted by any key: recovery reports it instead of requiring it, and it reads as an
    integrity failure while the rest is served."""
    server = node.nexus
    put(agent, server, "f/forged", "k=forged")
    put(agent, server, "f/fine", "k=fine")
    assert server.stop() == 0
    conn = writer(node.data_dir)
    try:
        blob = bytearray(conn.execute("SELECT blob FROM records WHERE path = 'f/forged'")
                         .fetchone()[0])
        blob[1:5] = (5).to_bytes(4, "big")
        conn.execute("UPDATE records SET blob = ?, generation = 5 WHERE path = 'f/forged'",
                     (bytes(blob),))
    finally:
        conn.close()
    server = node.restart()
    assert get_data(agent, server, "f/fine") == {"k": "fine"}
    forged = pilot(["secret", "get", "f/forged"], agent.env("pilot"), server)
    assert forged.returncode == 1 and "failed its integrity check" in forged.stderr
    assert any("no generation this Nexus created" in str(e.get("event"))
               for e in server.log_events())


def test_postgres_tampered_metadata_and_generation_cell(agent: DevAgent, pg_dsn: str) -> None:
    """The same on a real PostgreSQL store, edited with psycopg while Nexus is stopped."""
    import psycopg

    from tests.harness import TEST_PASSWORD, short_tmpdir

    data_dir = short_tmpdir("nxpg-")
    args = ["--store", "postgres", "--dsn", pg_dsn]
    server = start_unsealed(agent, data_dir, args)
    try:
        for i in (1, 2, 3):
            put(agent, server, "p/oldest", f"k=v{i}")
        put(agent, server, "p/cell", "k=cell")
        assert server.stop() == 0
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE secret_meta SET oldest_version = 99 WHERE path = 'p/oldest'")
            conn.execute("UPDATE records SET generation = 7 WHERE path = 'p/cell'")
        server = Nexus(data_dir, agent.env("nexus"), args=args)
        recovered = pilot(["recover", "--password-stdin"], agent.env("pilot"), server,
                          stdin=TEST_PASSWORD + "\n")
        assert recovered.returncode == 0, recovered.stderr
        assert get_data(agent, server, "p/cell") == {"k": "cell"}
        refused(agent, server, "p/oldest")
        with psycopg.connect(pg_dsn) as conn:
            versions = [r[0] for r in conn.execute(
                "SELECT version FROM records WHERE path = 'p/oldest' ORDER BY version")]
            cells = {r[0] for r in conn.execute("SELECT generation FROM records")}
        assert versions == [1, 2, 3] and cells == {1}
        rotated = pilot(["rotate", "--output", "json"], agent.env("pilot"), server,
                        timeout=300)
        assert rotated.returncode == 0, rotated.stderr
        assert get_data(agent, server, "p/cell") == {"k": "cell"}
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
