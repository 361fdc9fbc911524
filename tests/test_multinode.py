"""Two Nexus nodes sharing one PostgreSQL store: a rotation on one node must never lead
the other to write under a key that is being dropped (data loss). The other node refuses
writes and reads it cannot serve, says why (exit 5), and works again after it recovers
with the current backup."""

from __future__ import annotations

import json
import shutil

from tests.harness import TEST_PASSWORD, DevAgent, Nexus, pilot, pilot_json, short_tmpdir

PW = TEST_PASSWORD + "\n"


def test_a_stale_node_refuses_to_write_after_another_node_rotated(agent: DevAgent,
                                                                   pg_dsn: str) -> None:
    su = agent.env("pilot")
    dirs = [short_tmpdir("mn-a-"), short_tmpdir("mn-b-")]
    args = ["--store", "postgres", "--dsn", pg_dsn]
    a = Nexus(dirs[0], agent.env("nexus"), args=args)
    b: Nexus | None = None
    try:
        assert pilot(["init", "--password-stdin"], su, a, stdin=PW).returncode == 0
        exported = dirs[0] / "export.backup"
        assert pilot(["backup", "export", "--out", str(exported)], su, a).returncode == 0
        # Node B shares the store; it unseals from a copy of A's backup.
        b = Nexus(dirs[1], agent.env("nexus"), args=args)
        assert pilot(["recover", "--password-stdin", "--backup-file", str(exported)], su, b,
                     stdin=PW).returncode == 0
        for i in range(20):
            assert pilot(["secret", "put", f"shared/s{i}", f"v=value-{i}"], su,
                         a if i % 2 else b).returncode == 0

        rotated = pilot(["rotate", "--output", "json", "--emergency"], su, a)
        assert rotated.returncode == 0, rotated.stderr
        assert json.loads(rotated.stdout.splitlines()[-1])["to_generation"] == 2

        # B still holds only generation 1: it must not write under it, nor pretend a
        # re-encrypted record is corrupt.
        write = pilot(["secret", "put", "shared/new", "v=x"], su, b)
        assert write.returncode == 5, write.stderr
        assert "another Nexus node rotated the root key" in write.stderr
        read = pilot(["secret", "get", "shared/s3"], su, b)
        assert read.returncode == 5, read.stderr
        assert "generation 2" in read.stderr

        # The operator's fix: restart B and recover it with the current backup.
        b.stop()
        newer = dirs[0] / "export2.backup"
        assert pilot(["backup", "export", "--out", str(newer)], su, a).returncode == 0
        b = Nexus(dirs[1], agent.env("nexus"), args=args)
        assert pilot(["recover", "--password-stdin", "--backup-file", str(newer)], su, b,
                     stdin=PW).returncode == 0
        assert pilot(["secret", "put", "shared/new", "v=x"], su, b).returncode == 0
        for i in range(20):
            got = pilot_json(["secret", "get", f"shared/s{i}", "--output", "json"], su, b)
            assert got["data"] == {"v": f"value-{i}"}
        status = pilot_json(["status", "--output", "json"], su, b)
        assert status["root_key_generation"] == 2
        assert set(status["records_by_generation"]) == {"2"}
    finally:
        a.stop()
        if b is not None:
            b.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

