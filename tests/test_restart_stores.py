"""Values survive kill -9, restart and recover byte for byte, on SQLite and PostgreSQL.

Written over raw gRPC (so values need no shell quoting), killed with SIGKILL right after the
last acknowledged write, restarted on the same store, recovered with the password, and read
back: unicode, empty strings, values at the 64 KiB limit, many keys, several versions.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import secrets_pb2, secrets_pb2_grpc
from tests.harness import (
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    pilot,
    pilot_json,
    short_tmpdir,
    start_unsealed,
)

TLS_NAME = "nexus.spike.internal"
LIMIT = 64 * 1024


def corpus() -> dict[str, dict[str, str]]:
    many = {f"key-{i:04d}": f"value {i} ✓" for i in range(1000)}
    return {
        "u/unicode": {"greek": "κλειδί", "emoji": "🔑🗝️", "cjk": "秘密の鍵", "rtl": "مفتاح",
                      "combining": "e\u0301", "nul": "a\x00b", "zwj": "👩‍👩‍👧",
                      "ws": " \t\r\n ", "ünï-kéy": "x"},
        "u/empty": {"empty": "", "also": ""},
        "u/max": {"k": "\x7f" * (LIMIT - 1)},
        "u/max-multibyte": {"k": "€" * ((LIMIT - 1) // 3)},
        "u/many": many,
        "u/json-ish": {"j": '{"a": [1, 2, "\\u0000"]}', "q": "'\"`$(rm -rf /)"},
    }


def write_all(nexus: Nexus, agent: DevAgent) -> dict[tuple[str, int], dict[str, str]]:
    written: dict[tuple[str, int], dict[str, str]] = {}
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")), TLS_NAME)
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        for path, data in corpus().items():
            reply = stub.Put(secrets_pb2.PutSecretRequest(path=path, data=data), timeout=30)
            written[(path, reply.version)] = data
        for i in range(1, 4):  # several versions of one path
            data = {"v": f"version {i}", "bin-ish": "".join(chr(c) for c in range(1, 256))}
            reply = stub.Put(secrets_pb2.PutSecretRequest(path="u/versions", data=data),
                             timeout=30)
            written[("u/versions", reply.version)] = data
        for i in range(200):  # many paths
            data = {"n": str(i)}
            reply = stub.Put(secrets_pb2.PutSecretRequest(path=f"bulk/{i:03d}", data=data),
                             timeout=30)
            written[(f"bulk/{i:03d}", reply.version)] = data
    finally:
        channel.close()
    return written


def read_all(nexus: Nexus, agent: DevAgent,
             written: dict[tuple[str, int], dict[str, str]]) -> None:
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")), TLS_NAME)
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        for (path, version), data in written.items():
            got = stub.Get(secrets_pb2.GetSecretRequest(path=path, version=version), timeout=30)
            assert got.version == version
            got_data = dict(got.data)
            assert got_data.keys() == data.keys(), path
            for key, value in data.items():
                assert got_data[key].encode() == value.encode(), (path, key)
        paths = list(stub.List(secrets_pb2.ListSecretsRequest(prefix=""), timeout=30).paths)
        assert sorted({p for p, _ in written}) == sorted(paths)
    finally:
        channel.close()


def survive(agent: DevAgent, data_dir: Path, store_args: list[str]) -> None:
    nexus = start_unsealed(agent, data_dir, store_args)
    try:
        written = write_all(nexus, agent)
        read_all(nexus, agent, written)
    finally:
        assert nexus.kill(signal.SIGKILL) == -signal.SIGKILL

    nexus = Nexus(data_dir, agent.env("nexus"), args=store_args)
    try:
        sealed = pilot(["secret", "get", "u/empty"], agent.env("pilot"), nexus)
        assert sealed.returncode == 5, sealed.stderr
        result = pilot(["recover", "--password-stdin"], agent.env("pilot"), nexus,
                       stdin=TEST_PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
        read_all(nexus, agent, written)
        # Through Pilot as well: the exact bytes of one value, and the JSON form.
        field = pilot(["secret", "get", "u/unicode", "--field", "zwj"], agent.env("pilot"),
                      nexus)
        assert field.returncode == 0 and field.stdout == "👩‍👩‍👧"
        got = pilot_json(["secret", "get", "u/unicode", "--output", "json"],
                         agent.env("pilot"), nexus)
        assert got["data"] == corpus()["u/unicode"]
        # And it keeps going: the next version follows the recovered ones.
        nxt = pilot_json(["secret", "put", "u/versions", "v=4", "--output", "json"],
                         agent.env("pilot"), nexus)
        assert nxt["version"] == 4
    finally:
        nexus.stop()


@pytest.fixture()
def sqlite_dir() -> Iterator[Path]:
    path = short_tmpdir("nxr-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_values_survive_restart_sqlite(agent: DevAgent, sqlite_dir: Path) -> None:
    survive(agent, sqlite_dir, [])


def test_values_survive_restart_postgres(agent: DevAgent, sqlite_dir: Path,
                                         pg_dsn: str) -> None:
    survive(agent, sqlite_dir, ["--store", "postgres", "--dsn", pg_dsn])
    assert not (sqlite_dir / "spike.db").exists()
