"""Tampering with the real SQLite database under a running Nexus.

Nexus is stopped (SIGTERM), ``records`` is edited with sqlite3, Nexus is restarted and
recovered. Every tampered record must fail with the one opaque integrity error (DATA_LOSS over
gRPC, Pilot exit 1), and Nexus must keep serving everything else. A tampered policy grants nothing
(deny-safe) while the other policies still apply.

Editing while Nexus runs is what a WAL second writer allows, but today an outside connection
that closes makes the running Nexus lose its later writes (see
``test_outside_connection_does_not_lose_later_writes``), so the tamper tests stop Nexus first.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import struct
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
    get_data,
    pilot,
    pilot_json,
    put,
    writer,
)

OPAQUE = "failed its integrity check"


@pytest.fixture()
def node(agent: DevAgent) -> Iterator[RestartableNexus]:
    running = RestartableNexus(agent)
    yield running
    running.nexus.stop()
    shutil.rmtree(running.data_dir, ignore_errors=True)


def blob_of(conn: sqlite3.Connection, kind: str, path: str, version: int) -> bytes:
    row = conn.execute("SELECT blob FROM records WHERE kind = ? AND path = ? AND version = ?",
                       (kind, path, version)).fetchone()
    assert row is not None and row[0] is not None, (kind, path, version)
    return bytes(row[0])


def set_blob(conn: sqlite3.Connection, kind: str, path: str, version: int, blob: bytes,
             generation: int | None = None) -> None:
    if generation is None:
        cur = conn.execute(
            "UPDATE records SET blob = ? WHERE kind = ? AND path = ? AND version = ?",
            (blob, kind, path, version))
    else:
        cur = conn.execute(
            "UPDATE records SET blob = ?, generation = ? WHERE kind = ? AND path = ? "
            "AND version = ?", (blob, generation, kind, path, version))
    assert cur.rowcount == 1


def integrity_failure(agent: DevAgent, server: Nexus, path: str, version: int = 0) -> str:
    args = ["secret", "get", path] + (["--version", str(version)] if version else [])
    result = pilot(args, agent.env("pilot"), server)
    assert result.returncode == 1, (path, version, result.returncode, result.stderr)
    assert OPAQUE in result.stderr, result.stderr
    # Same message whatever the tampering: only the path and version differ.
    message = result.stderr.replace(path, "PATH")
    return re.sub(r"version \d+", "version N", message)


def tamper_secrets(data_dir: Path) -> None:
    """Every kind of tampering with a secret's row, with Nexus stopped."""
    conn = writer(data_dir)
    try:
        # 1. One flipped bit in the ciphertext body, and one in the tag.
        blob = bytearray(blob_of(conn, "secret", "t/flip", 1))
        blob[len(blob) // 2] ^= 0x01
        set_blob(conn, "secret", "t/flip", 1, bytes(blob))
        blob = bytearray(blob_of(conn, "secret", "t/tag", 1))
        blob[-1] ^= 0x80
        set_blob(conn, "secret", "t/tag", 1, bytes(blob))
        # 2. A ciphertext copied to another path (valid envelope, wrong identity).
        set_blob(conn, "secret", "t/dst", 1, blob_of(conn, "secret", "t/src", 1))
        # 3. A ciphertext copied to another version of the same path.
        set_blob(conn, "secret", "t/ver", 2, blob_of(conn, "secret", "t/ver", 1))
        # 4. The header rewritten to another generation, the row's generation column too
        #    (recovery goes by the headers and does not require a generation that this
        #    Nexus never created: tests/test_metadata_integrity.py).
        blob = bytearray(blob_of(conn, "secret", "t/gen", 1))
        struct.pack_into(">I", blob, 1, 2)
        set_blob(conn, "secret", "t/gen", 1, bytes(blob), generation=2)
        blob = bytearray(blob_of(conn, "secret", "t/gen0", 1))
        struct.pack_into(">I", blob, 1, 0)
        set_blob(conn, "secret", "t/gen0", 1, bytes(blob))
        # 5. A truncated blob.
        set_blob(conn, "secret", "t/short", 1, blob_of(conn, "secret", "t/short", 1)[:9])
    finally:
        conn.close()


def test_tampered_secrets_fail_opaquely_and_the_rest_is_served(agent: DevAgent,
                                                               node: RestartableNexus) -> None:
    server = node.nexus
    put(agent, server, "t/flip", "k=flip-me")
    put(agent, server, "t/tag", "k=tag")
    put(agent, server, "t/src", "k=source")
    put(agent, server, "t/dst", "k=destination")
    put(agent, server, "t/ver", "k=v1")
    put(agent, server, "t/ver", "k=v2")
    put(agent, server, "t/gen", "k=generation")
    put(agent, server, "t/gen0", "k=generation0")
    put(agent, server, "t/short", "k=short")
    put(agent, server, "t/ok", "k=untouched", "u=ünïcødé")
    assert server.stop() == 0
    tamper_secrets(node.data_dir)
    server = node.restart()

    messages = {
        integrity_failure(agent, server, path)
        for path in ("t/flip", "t/tag", "t/dst", "t/ver", "t/gen", "t/gen0", "t/short")
    }
    assert len(messages) == 1, messages

    # Untampered records are still served, including the untouched version of t/ver and
    # the source of the copy.
    assert get_data(agent, server, "t/ok") == {"k": "untouched", "u": "ünïcødé"}
    assert get_data(agent, server, "t/src") == {"k": "source"}
    assert get_data(agent, server, "t/ver", 1) == {"k": "v1"}
    # Writing a new version over a tampered one works, and that one reads back.
    assert put(agent, server, "t/flip", "k=fresh") == 2
    assert get_data(agent, server, "t/flip") == {"k": "fresh"}

    # Over raw gRPC: DATA_LOSS with the same opaque message.
    channel = client_channel(server.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Get(secrets_pb2.GetSecretRequest(path="t/tag"), timeout=10)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        assert OPAQUE in (info.value.details() or "")
    finally:
        channel.close()

    # The failure is logged, with no plaintext, and Nexus is still up.
    assert server.proc.poll() is None
    assert any(e.get("event") == "secret failed its integrity check"
               for e in server.log_events())
    assert not any("flip-me" in line or "destination" in line for line in server.lines)


def test_tampered_policy_is_ignored_deny_safe(agent: DevAgent,
                                              node: RestartableNexus) -> None:
    server = node.nexus
    su = agent.env("pilot")
    workload = agent.env("workload")
    for name, prefix in (("good", "pg"), ("bad", "pb")):
        pilot_json(["policy", "put", name, "--spiffe-id-pattern",
                    "spiffe://spike\\.internal/workload/demo", "--path-pattern",
                    f"{prefix}/.*", "--permissions", "read,list", "--output", "json"],
                   su, server)
        put(agent, server, f"{prefix}/s", f"k={name}")
    assert pilot(["secret", "get", "pb/s"], workload, server).returncode == 0
    assert pilot(["secret", "get", "pg/s"], workload, server).returncode == 0
    assert server.stop() == 0

    conn = writer(node.data_dir)
    try:
        blob = bytearray(blob_of(conn, "policy", "bad", 0))
        blob[-5] ^= 0x10
        set_blob(conn, "policy", "bad", 0, bytes(blob))
        # And the good policy's ciphertext copied under a third name: must not decrypt.
        conn.execute(
            "INSERT INTO records (kind, path, version, generation, blob, created_at) "
            "SELECT kind, 'copied', version, generation, blob, created_at FROM records "
            "WHERE kind = 'policy' AND path = 'good'")
    finally:
        conn.close()
    server = node.restart()

    denied = pilot(["secret", "get", "pb/s"], workload, server)
    assert denied.returncode == 4, denied.stderr
    ok = pilot(["secret", "get", "pg/s", "--output", "json"], workload, server)
    assert ok.returncode == 0, ok.stderr
    listed = pilot_json(["secret", "list", "p", "--output", "json"], workload, server)
    assert listed["paths"] == ["pg/s"]
    assert any(e.get("event") == "policy failed its integrity check; ignored"
               for e in server.log_events())
    # The superuser still sees the intact policies; the tampered one reads as an integrity
    # failure, never as garbage.
    good = pilot_json(["policy", "get", "good", "--output", "json"], su, server)
    assert good["path_pattern"] == "pg/.*"
    bad = pilot(["policy", "get", "bad"], su, server)
    assert bad.returncode == 1 and OPAQUE in bad.stderr, bad.stderr
    listing = pilot(["policy", "list", "--output", "json"], su, server)
    assert listing.returncode == 0, listing.stderr
    names = [p["name"] for p in json.loads(listing.stdout)["policies"]]
    assert names == ["good"], listing.stdout


def test_outside_connection_does_not_lose_later_writes(agent: DevAgent,
                                                       node: RestartableNexus) -> None:
    server = node.nexus
    put(agent, server, "live/before", "k=1")
    # Any outside reader (sqlite3 shell, a backup script, this test) opening and closing.
    conn = sqlite3.connect(node.data_dir / "spike.db")
    assert conn.execute("SELECT count(*) FROM records WHERE kind = 'secret'").fetchone() == (1,)
    conn.close()
    put(agent, server, "live/after", "k=2")
    server.kill(signal.SIGKILL)
    server = node.restart()
    assert get_data(agent, server, "live/before") == {"k": "1"}
    assert get_data(agent, server, "live/after") == {"k": "2"}
