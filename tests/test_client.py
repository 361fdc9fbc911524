"""spike.Client, the client library for workloads, against real Nexus processes: every method
round trip, the typed errors (NotFound, PermissionDenied, Sealed, Conflict, Unavailable), and a
workload that keeps reading while its SVID is re-issued, Nexus closes connections by age and a
rotation runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import spike
from spike.client import KIND_ERRORS, ClientError
from spike.errors import ErrorKind, SpikeError
from tests.harness import (
    PY,
    ROOT,
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    pilot,
    short_tmpdir,
    start_unsealed,
)

WORKLOAD = "spiffe://spike.internal/workload/demo"


def allow_workload(agent: DevAgent, server: Nexus, name: str, path_pattern: str,
                   permissions: str) -> None:
    result = pilot(["policy", "put", name, "--spiffe-id-pattern", f"^{WORKLOAD}$",
                    "--path-pattern", path_pattern, "--permissions", permissions],
                   agent.env("pilot"), server)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def server(agent: DevAgent) -> Iterator[Nexus]:
    data_dir = short_tmpdir("nxc-")
    running = start_unsealed(agent, data_dir)
    allow_workload(agent, running, "client-demo", "^apps/demo/.*$", "read,write,list")
    yield running
    running.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def client(agent: DevAgent, server: Nexus, name: str = "pilot") -> spike.Client:
    return spike.Client(server.address, socket=agent.socket(name))


def test_every_error_kind_maps_to_a_client_error() -> None:
    assert set(KIND_ERRORS) == set(ErrorKind)
    assert all(issubclass(cls, ClientError) for cls in KIND_ERRORS.values())
    for name in ("NotFound", "PermissionDenied", "Sealed", "Conflict", "Unavailable"):
        assert issubclass(getattr(spike, name), spike.SpikeError)
    assert spike.SpikeError is SpikeError
    assert issubclass(spike.Uninitialized, spike.Sealed)


def test_round_trip_of_every_method(agent: DevAgent, server: Nexus) -> None:
    with client(agent, server) as c:
        assert c.put("rt/db", {"user": "u1", "pass": "p1"}) == 1
        assert c.put("rt/db", {"user": "u2", "pass": "p2"}, cas=1) == 2
        assert c.get("rt/db") == {"user": "u2", "pass": "p2"}
        assert c.get("rt/db", version=1) == {"user": "u1", "pass": "p1"}
        for i in range(5):
            c.put(f"rt/many/{i}", {"i": str(i)})
        expected = [f"rt/many/{i}" for i in range(5)]
        # Two paths a page: the client follows the tokens through three pages.
        assert c.list("rt/many/", page_size=2) == expected
        assert c.list("rt/many/") == expected
        assert "rt/db" in c.list()
        meta = c.metadata("rt/db")
        assert isinstance(meta, spike.SecretMetadata)
        assert (meta.path, meta.current_version, meta.oldest_version) == ("rt/db", 2, 1)
        assert [v.version for v in meta.versions] == [1, 2]
        assert all(v.deleted is None and not v.destroyed for v in meta.versions)
        assert meta.created is not None and meta.updated is not None
        with pytest.raises(AttributeError):
            meta.path = "other"  # type: ignore[misc]  # frozen
        c.delete("rt/db")
        after = c.metadata("rt/db")
        assert [v.deleted is not None for v in after.versions] == [False, True]
        c.delete("rt/db", versions=[1])
        assert all(v.deleted is not None for v in c.metadata("rt/db").versions)
        with pytest.raises(spike.NotFound):
            c.get("rt/db")


def test_not_found_and_permission_denied(agent: DevAgent, server: Nexus) -> None:
    with client(agent, server) as admin:
        admin.put("apps/other/db", {"pass": "not-for-the-workload"})
    with client(agent, server, "workload") as c:
        with pytest.raises(spike.NotFound) as missing:
            c.get("apps/demo/missing")
        assert missing.value.kind == ErrorKind.NOT_FOUND
        assert "apps/demo/missing" in str(missing.value)
        with pytest.raises(spike.PermissionDenied) as denied:
            c.get("apps/other/db")
        assert denied.value.kind == ErrorKind.PERMISSION_DENIED
        assert "not-for-the-workload" not in str(denied.value)
        with pytest.raises(spike.PermissionDenied):
            c.put("apps/other/db", {"pass": "x"})
        # What the policy grants works, and listing shows only the allowed paths.
        assert c.put("apps/demo/db", {"pass": "mine"}) == 1
        assert c.get("apps/demo/db") == {"pass": "mine"}
        assert c.list("apps/") == ["apps/demo/db"]


def test_conflict_on_a_bad_cas(agent: DevAgent, server: Nexus) -> None:
    with client(agent, server) as c:
        assert c.put("cas/x", {"a": "1"}, cas=0) == 1
        with pytest.raises(spike.Conflict) as bad:
            c.put("cas/x", {"a": "secret-value-2"}, cas=0)
        assert bad.value.kind == ErrorKind.CONFLICT and not bad.value.after_retry
        assert "secret-value-2" not in str(bad.value)
        with pytest.raises(spike.Conflict):
            c.put("cas/x", {"a": "2"}, cas=5)
        assert c.put("cas/x", {"a": "2"}, cas=1) == 2


def test_one_client_shared_by_threads(agent: DevAgent, server: Nexus) -> None:
    with client(agent, server) as c:
        for i in range(8):
            c.put(f"threads/{i}", {"i": str(i)})

        def read(i: int) -> bool:
            return all(c.get(f"threads/{i}") == {"i": str(i)} for _ in range(20))

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(read, range(8)))


def test_unavailable_within_the_deadline(agent: DevAgent) -> None:
    # Nothing listens there: the client retries inside its deadline, then says so.
    with spike.Client("127.0.0.1:9", socket=agent.socket("pilot"), timeout=0.5) as c, \
            pytest.raises(spike.Unavailable):
        c.get("any/path")


def test_sealed_nexus(agent: DevAgent) -> None:
    data_dir = short_tmpdir("nxs-")
    try:
        first = start_unsealed(agent, data_dir)
        with client(agent, first) as c:
            c.put("s/x", {"a": "1"})
        assert first.stop() == 0
        sealed = Nexus(data_dir, agent.env("nexus"))  # every start is sealed
        try:
            with client(agent, sealed) as c:
                with pytest.raises(spike.Sealed) as exc:
                    c.get("s/x")
                assert exc.value.kind == ErrorKind.SEALED
                assert not isinstance(exc.value, spike.Uninitialized)
            result = pilot(["recover", "--password-stdin"], agent.env("pilot"), sealed,
                           stdin=TEST_PASSWORD + "\n")
            assert result.returncode == 0, result.stderr
            with client(agent, sealed) as c:
                assert c.get("s/x") == {"a": "1"}
        finally:
            sealed.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_configured_from_the_environment(agent: DevAgent, server: Nexus,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", agent.socket("workload"))
    monkeypatch.setenv("SPIKE_NEXUS_ADDR", server.address)
    for name in ("SPIKE_SVID_CERT", "SPIKE_SVID_KEY", "SPIKE_TRUST_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with spike.Client() as c:
        assert c.svid.spiffe_id == WORKLOAD
        c.put("apps/demo/env", {"k": "v"})
        assert c.get("apps/demo/env") == {"k": "v"}
    # An explicit argument overrides the environment.
    with spike.Client(socket=agent.socket("pilot")) as c:
        assert c.svid.spiffe_id != WORKLOAD


# ------------------------------------------------------- reads through rotations of all kinds

READER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import spike

    stop, least = Path(sys.argv[1]), float(sys.argv[2])
    reads, failures, serials = 0, [], []
    with spike.Client() as client:
        print("started", flush=True)
        began = time.monotonic()
        while not (stop.exists() and time.monotonic() - began >= least):
            serial = client.svid.serial
            if serial not in serials:
                serials.append(serial)
            try:
                data = client.get("apps/demo/creds")
                if data != {"user": "app", "pass": "steady"}:
                    failures.append("wrong data")
                reads += 1
            except spike.SpikeError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.01)  # steady, not a CPU hog
    print(json.dumps({"reads": reads, "failures": failures[:20],
                      "failed": len(failures), "serials": len(serials)}), flush=True)
""")


def test_reads_survive_svid_reissue_connection_age_and_rotation(tmp: Path) -> None:
    rotating = DevAgent(ttl=10)  # re-issues every SVID at half its TTL: every 5 s
    data_dir = short_tmpdir("nxr-")
    try:
        server = start_unsealed(rotating, data_dir, ["--max-connection-age-seconds", "5"])
        try:
            _read_through_rotations(rotating, server, tmp)
        finally:
            server.stop()
    finally:
        rotating.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _read_through_rotations(agent: DevAgent, server: Nexus, tmp: Path) -> None:
    env = agent.env("pilot")
    for i in range(20):  # some records for the rotation to re-encrypt
        assert pilot(["secret", "put", f"apps/fill/{i}", "v=x"], env, server).returncode == 0
    assert pilot(["secret", "put", "apps/demo/creds", "user=app", "pass=steady"], env,
                 server).returncode == 0
    allow_workload(agent, server, "reader", "^apps/demo/.*$", "read")
    script = tmp / "reader.py"
    script.write_text(READER)
    stop = tmp / "stop"
    reader_env = agent.env("workload") | {"SPIKE_NEXUS_ADDR": server.address}
    reader = subprocess.Popen([PY, str(script), str(stop), "40"], env=reader_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "started", reader.stderr
        rotated = pilot(["rotate"], env, server, timeout=600)  # runs while the reader reads
        assert rotated.returncode == 0, rotated.stderr
        stop.touch()
        out, err = reader.communicate(timeout=600)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    summary = json.loads(out.splitlines()[-1])
    print("reader:", summary)
    assert summary["failed"] == 0, (summary, err)
    assert summary["reads"] > 0
    assert summary["serials"] >= 2, summary  # the SVID was re-issued under the reader


def test_pilot_builds_on_the_same_connection_layer() -> None:
    """One client, not two: Pilot's NexusClient opens its channels through spike.client's
    Connection (identity, pinned TLS name, Nexus chain check, channels); it has no channel
    or chain-check code of its own."""
    from pilot.client import NexusClient
    from spike.client import Connection

    client = NexusClient("127.0.0.1:1", "nexus.example")
    assert isinstance(client.connection, Connection)
    assert (client.connection.address, client.connection.tls_name) == ("127.0.0.1:1",
                                                                       "nexus.example")
    source = (ROOT / "pilot" / "client.py").read_text()
    for own in ("check_server_svid", "client_channel", "time.sleep"):
        assert own not in source, own
