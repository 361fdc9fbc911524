"""Check-and-set under contention through the real server: 8 writers x 200 CAS writes to one
path, each on its own mTLS channel. No update may be lost, no version handed out twice."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from spike.identity import SvidMaterial, fetch_svid
from spike.tls import client_channel
from spike.v1 import secrets_pb2, secrets_pb2_grpc
from tests.harness import DevAgent, Nexus, short_tmpdir, start_unsealed

WRITERS = 8
WRITES = 200
PATH = "race/counter"
TLS_NAME = "nexus.spike.internal"


@pytest.fixture()
def server(agent: DevAgent) -> Iterator[Nexus]:
    data_dir = short_tmpdir("nxc-")
    running = start_unsealed(agent, data_dir, ["--max-secret-versions", "2000"])
    yield running
    running.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def current_version(stub: secrets_pb2_grpc.SecretsStub) -> int:
    try:
        return int(stub.Get(secrets_pb2.GetSecretRequest(path=PATH), timeout=30).version)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise


def cas_writes(address: str, material: SvidMaterial, index: int, start: threading.Barrier,
               conflicts: list[int]) -> list[tuple[int, str]]:
    """Writer ``index``: WRITES check-and-set puts, each retried until it wins; what it won."""
    channel = client_channel(address, material, TLS_NAME)
    stub = secrets_pb2_grpc.SecretsStub(channel)
    won: list[tuple[int, str]] = []
    try:
        current_version(stub)  # connect before the race starts
        start.wait()
        for seq in range(WRITES):
            value = f"w{index}-{seq}"
            while True:
                cas = current_version(stub)
                request = secrets_pb2.PutSecretRequest(path=PATH, data={"v": value},
                                                       cas=cas)
                try:
                    reply = stub.Put(request, timeout=30)
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.ABORTED:
                        conflicts[index] += 1
                        continue
                    raise
                assert reply.version == cas + 1, (cas, reply.version)
                won.append((int(reply.version), value))
                break
    finally:
        channel.close()
    return won


def assert_all_stored(address: str, material: SvidMaterial, expected: dict[int, str],
                      total: int) -> None:
    """Every successful write is stored, under the version it was told, with its own value."""
    channel = client_channel(address, material, TLS_NAME)
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        meta = stub.Metadata(secrets_pb2.SecretMetadataRequest(path=PATH), timeout=30)
        assert meta.current_version == total and meta.oldest_version == 1
        assert [v.version for v in meta.versions] == list(range(1, total + 1))

        def check(version: int) -> None:
            got = stub.Get(secrets_pb2.GetSecretRequest(path=PATH, version=version), timeout=30)
            assert dict(got.data) == {"v": expected[version]}, version

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(check, range(1, total + 1)))
    finally:
        channel.close()


def test_cas_writers_lose_no_update(agent: DevAgent, server: Nexus) -> None:
    material = fetch_svid(agent.socket("pilot"))
    start = threading.Barrier(WRITERS)
    conflicts = [0] * WRITERS

    def writer(index: int) -> list[tuple[int, str]]:
        return cas_writes(server.address, material, index, start, conflicts)

    began = time.monotonic()
    with ThreadPoolExecutor(WRITERS) as pool:
        results = list(pool.map(writer, range(WRITERS)))
    elapsed = time.monotonic() - began
    total = WRITERS * WRITES
    print(f"\n{WRITERS} writers x {WRITES} CAS writes: {elapsed:.1f} s, "
          f"{total / elapsed:.0f} successful writes/s, {sum(conflicts)} conflicts retried")

    versions = [v for won in results for v, _ in won]
    assert len(versions) == total
    assert len(set(versions)) == total, "a version was handed out twice"
    assert sorted(versions) == list(range(1, total + 1))

    assert_all_stored(server.address, material,
                      {v: value for won in results for v, value in won}, total)
    assert elapsed < 90, f"took {elapsed:.1f} s"
