"""Health checking keeps no state for names a caller makes up (issue: Health.Watch memory)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spike.identity import fetch_svid
from spike.tls import client_channel
from tests.harness import DevAgent, Nexus

MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture()
def workload_stub(agent: DevAgent, nexus: Nexus) -> Iterator[health_pb2_grpc.HealthStub]:
    channel = client_channel(nexus.address, fetch_svid(agent.socket("workload")),
                             "nexus.spike.internal")
    yield health_pb2_grpc.HealthStub(channel)
    channel.close()


def test_known_services_are_checked_and_watched(workload_stub: health_pb2_grpc.HealthStub) -> None:
    for name in ("", "spike.v1.Operator", "spike.v1.Secrets", "spike.v1.Policies"):
        reply = workload_stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=20)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # sealed
    stream = workload_stub.Watch(health_pb2.HealthCheckRequest(service="spike.v1.Secrets"),
                                 timeout=20)
    assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING
    stream.cancel()


@pytest.mark.parametrize("name", ["nope", "spike.v1.Secrets ", "x" * 300])
def test_unknown_names_are_answered_without_state(workload_stub: health_pb2_grpc.HealthStub,
                                                  name: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        workload_stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=20)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert name not in (info.value.details() or "")
    # Watch answers SERVICE_UNKNOWN once and ends the stream (nothing to wait for).
    replies = list(workload_stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=20))
    assert [r.status for r in replies] == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]


def test_watch_streams_with_huge_names_do_not_grow_nexus(
        workload_stub: health_pb2_grpc.HealthStub, nexus: Nexus) -> None:
    """150 cancelled Watch streams with distinct 1 MiB names: RSS grows < 32 MiB."""
    # Warm up the server's buffers with one such call first.
    for stream in [workload_stub.Watch(health_pb2.HealthCheckRequest(service="w" * MIB),
                                       timeout=60)]:
        next(stream, None)
        stream.cancel()
    before = rss_bytes(nexus.proc.pid)
    for i in range(150):
        name = f"{i:04d}" + "n" * (MIB - 8)
        stream = workload_stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=60)
        first = next(stream, None)  # the server has taken the request in
        assert first is not None
        stream.cancel()
    # A call after the last stream proves the server went through them all.
    assert workload_stub.Check(health_pb2.HealthCheckRequest(), timeout=20) is not None
    growth = rss_bytes(nexus.proc.pid) - before
    print(f"nexus RSS growth after 150 x 1 MiB Watch names: {growth / MIB:.1f} MiB")
    assert growth < 32 * MIB, f"Nexus grew by {growth / MIB:.0f} MiB"
