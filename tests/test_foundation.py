"""Foundation: SPIFFE mTLS between Pilot and Nexus, authorization, gate — real processes."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devagent.ca import CertificateAuthority
from nexus.api.authz import SERVED_WHILE_SEALED, in_trust_domain, rpc_rules
from nexus.api.server import SERVICE_NAMES
from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import operator_pb2, policies_pb2, secrets_pb2, secrets_pb2_grpc
from tests.harness import (
    ROOT,
    DevAgent,
    Nexus,
    audit_events,
    base_env,
    pem_env,
    pilot,
    short_tmpdir,
    wait_for,
)

TD = "spike.internal"
SUPERUSER = f"spiffe://{TD}/spike/pilot/role/superuser"


# ---------------------------------------------------------------- pure table checks


def test_every_rpc_has_an_authorization_entry() -> None:
    from grpc_health.v1 import health_pb2 as hp
    from grpc_reflection.v1alpha import reflection_pb2

    rules = rpc_rules(TD)
    served = []
    for module, names in (
        (operator_pb2, ["Operator"]), (secrets_pb2, ["Secrets"]), (policies_pb2, ["Policies"]),
        (hp, ["Health"]), (reflection_pb2, ["ServerReflection"]),
    ):
        for name in names:
            service = module.DESCRIPTOR.services_by_name[name]
            served += [f"/{service.full_name}/{m.name}" for m in service.methods]
    missing = [m for m in served if m not in rules]
    assert not missing, f"RPCs without an authorization rule: {missing}"
    assert len(SERVICE_NAMES) == 3
    assert set(rules) >= SERVED_WHILE_SEALED


def test_identity_matching_is_exact() -> None:
    rules = rpc_rules(TD)
    init = rules["/spike.v1.Operator/Init"]
    assert init.allows(SUPERUSER)
    for other in (SUPERUSER + "2", SUPERUSER + "/x", SUPERUSER.replace(TD, "evil.example"),
                  f"spiffe://{TD}/spike/pilot/role/recover", ""):
        assert not init.allows(other), other
    member = in_trust_domain(TD)
    assert member(f"spiffe://{TD}/workload/a")
    assert not member(f"spiffe://{TD}.evil/workload/a")
    assert not member(f"spiffe://{TD}/")


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run([sys.executable, "-m", "spike._protogen", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- allowed


def test_superuser_gets_status(agent: DevAgent, nexus: Nexus) -> None:
    result = pilot(["status", "--output", "json"], agent.env("pilot"), nexus)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "uninitialized"
    assert status["caller"] == SUPERUSER
    text = pilot(["status"], agent.env("pilot"), nexus)
    assert text.returncode == 0 and "uninitialized" in text.stdout
    # The recover role may read status too.
    assert pilot(["status"], agent.env("recover"), nexus).returncode == 0


# ---------------------------------------------------------------- denied


def test_unlisted_spiffe_id_is_denied_and_audited(agent: DevAgent, nexus: Nexus) -> None:
    result = pilot(["status"], agent.env("workload"), nexus)
    assert result.returncode == 4, result.stderr
    assert "permission denied" in result.stderr and "hint:" in result.stderr
    denied = [e for e in audit_events(nexus.data_dir) if e["action"] == "rpc.denied"]
    assert denied and denied[-1]["caller"] == f"spiffe://{TD}/workload/demo"
    assert denied[-1]["target"] == "/spike.v1.Operator/Status"
    assert any(e.get("event") == "audit" and e.get("outcome") == "denied"
               for e in nexus.log_events())


def test_no_client_certificate_is_refused(agent: DevAgent, nexus: Nexus) -> None:
    material = fetch_svid(agent.socket("pilot"))
    creds = grpc.ssl_channel_credentials(root_certificates=material.bundle_pem)
    channel = grpc.secure_channel(
        nexus.address, creds, options=[("grpc.ssl_target_name_override", "nexus.spike.internal")]
    )
    stub = secrets_pb2_grpc.SecretsStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(secrets_pb2.GetSecretRequest(path="a"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_foreign_ca_is_refused(agent: DevAgent, nexus: Nexus) -> None:
    foreign = CertificateAuthority.generate(TD)
    leaf = foreign.issue_svid(SUPERUSER)
    tmp = short_tmpdir("pem-")
    ours = fetch_svid(agent.socket("pilot")).bundle_pem
    result = pilot(["status"], pem_env(tmp, leaf.cert_chain_pem(), leaf.key_pem(), ours), nexus)
    assert result.returncode == 3, result.stderr
    assert "TLS" in result.stderr or "unreachable" in result.stderr


def test_two_uri_sans_are_denied(agent: DevAgent, nexus: Nexus, agent_ca_dir: Path) -> None:
    ca = CertificateAuthority.load(agent_ca_dir)
    leaf = ca.issue(uris=[SUPERUSER, f"spiffe://{TD}/workload/demo"])
    tmp = short_tmpdir("pem-")
    # Pilot refuses to use such a certificate itself; use a raw channel.
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.bundle_pem(), private_key=leaf.key_pem(),
        certificate_chain=leaf.cert_chain_pem(),
    )
    channel = grpc.secure_channel(
        nexus.address, creds, options=[("grpc.ssl_target_name_override", "nexus.spike.internal")]
    )
    from spike.v1 import operator_pb2_grpc

    with pytest.raises(grpc.RpcError) as info:
        operator_pb2_grpc.OperatorStub(channel).Status(operator_pb2.StatusRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    denied = [e for e in audit_events(nexus.data_dir) if e["action"] == "rpc.denied"]
    assert denied and denied[-1]["caller"] == "(none)"
    del tmp


def test_expired_svid_is_refused(agent: DevAgent, nexus: Nexus, agent_ca_dir: Path) -> None:
    ca = CertificateAuthority.load(agent_ca_dir)
    now = dt.datetime.now(dt.UTC)
    leaf = ca.issue(uris=[SUPERUSER], not_before=now - dt.timedelta(hours=2),
                    not_after=now - dt.timedelta(hours=1))
    tmp = short_tmpdir("pem-")
    result = pilot(["status"], pem_env(tmp, leaf.cert_chain_pem(), leaf.key_pem(),
                                       ca.bundle_pem()), nexus)
    assert result.returncode == 3, result.stderr


def test_pilot_refuses_server_without_pinned_dns_name(agent: DevAgent, agent_ca_dir: Path,
                                                      data_dir: Path) -> None:
    ca = CertificateAuthority.load(agent_ca_dir)
    server_leaf = ca.issue_svid(f"spiffe://{TD}/spike/nexus", dns_names=["imposter.example"])
    tmp = short_tmpdir("pem-")
    (tmp / "c.pem").write_bytes(server_leaf.cert_chain_pem())
    (tmp / "k.pem").write_bytes(server_leaf.key_pem())
    (tmp / "b.pem").write_bytes(ca.bundle_pem())
    imposter = Nexus(data_dir, base_env(), args=[
        "--svid-cert", str(tmp / "c.pem"), "--svid-key", str(tmp / "k.pem"),
        "--trust-bundle", str(tmp / "b.pem"), "--tls-name", "imposter.example"])
    try:
        result = pilot(["status"], agent.env("pilot"), imposter)
        assert result.returncode == 3, result.stderr
        assert "TLS" in result.stderr
    finally:
        imposter.stop()


def test_nexus_refuses_to_run_with_a_foreign_identity(agent: DevAgent, data_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nexus", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
        env=agent.env("pilot"), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "must run as spiffe://spike.internal/spike/nexus" in proc.stderr


def test_pilot_reports_missing_agent_socket() -> None:
    env = base_env()
    env["SPIFFE_ENDPOINT_SOCKET"] = "unix:///tmp/does-not-exist-spike.sock"
    result = pilot(["status"], env, "127.0.0.1:1")
    assert result.returncode == 3
    assert "does not exist" in result.stderr and "hint:" in result.stderr


def test_pilot_reports_unreachable_nexus(agent: DevAgent) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = pilot(["status"], agent.env("pilot"), f"127.0.0.1:{port}")
    assert result.returncode == 3
    assert "unreachable" in result.stderr and "hint:" in result.stderr


# ---------------------------------------------------------------- gate and health


def test_sealed_gate_and_health(agent: DevAgent, nexus: Nexus) -> None:
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    with pytest.raises(grpc.RpcError) as info:
        secrets_pb2_grpc.SecretsStub(channel).Get(secrets_pb2.GetSecretRequest(path="a"),
                                                  timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "spike init" in (info.value.details() or "")
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    channel.close()


def test_sigterm_stops_gracefully(agent: DevAgent, data_dir: Path) -> None:
    running = Nexus(data_dir, agent.env("nexus"))
    assert running.stop() == 0
    assert any(e.get("event") == "nexus stopped" for e in running.log_events())


# ---------------------------------------------------------------- SVID rotation


def server_certificate_serial(address: str, chain: bytes, key: bytes, bundle: bytes) -> int:
    tmp = short_tmpdir("tls-")
    (tmp / "c.pem").write_bytes(chain)
    (tmp / "k.pem").write_bytes(key)
    (tmp / "b.pem").write_bytes(bundle)
    ctx = ssl.create_default_context(cafile=str(tmp / "b.pem"))
    ctx.load_cert_chain(str(tmp / "c.pem"), str(tmp / "k.pem"))
    ctx.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(
        raw, server_hostname="nexus.spike.internal"
    ) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_new_handshakes_get_the_rotated_svid() -> None:
    short = DevAgent(ttl=6)
    data = short_tmpdir("nx-")
    running = Nexus(data, short.env("nexus"))
    try:
        def current() -> int:
            m = fetch_svid(short.socket("pilot"))
            return server_certificate_serial(running.address, m.cert_chain_pem,
                                             m.private_key_pem, m.bundle_pem)

        first = current()
        assert wait_for(lambda: current() != first, timeout=20), "server SVID never rotated"
        # Still serving, with no restart.
        assert pilot(["status"], short.env("pilot"), running).returncode == 0
        assert running.proc.poll() is None
    finally:
        running.stop()
        short.stop()


def test_help_imports_neither_grpc_nor_spiffe() -> None:
    """`spike --help` stays fast by importing no heavy module (speed itself: make bench)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pilot", "--help"],
                            cwd=ROOT, capture_output=True, text=True, env=base_env())
    assert result.returncode == 0 and "rotate" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    heavy = {m for m in imported if m.split(".")[0] in ("grpc", "spiffe", "cryptography")}
    assert not heavy, sorted(heavy)


def test_open_health_watches_do_not_starve_the_server(agent: DevAgent, nexus: Nexus) -> None:
    """Health.Watch is open to every workload; its streams must not pin worker threads."""
    channel = client_channel(nexus.address, fetch_svid(agent.socket("workload")),
                             "nexus.spike.internal")
    stub = health_pb2_grpc.HealthStub(channel)
    streams = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(48)]
    try:
        for stream in streams[:3]:
            assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING
        started = time.monotonic()
        result = pilot(["status"], agent.env("pilot"), nexus, timeout=30)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 15
    finally:
        for stream in streams:
            stream.cancel()
        channel.close()
