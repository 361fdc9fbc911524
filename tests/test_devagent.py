"""Tests of spike-dev-agent: the CA (pure) and the real agent process over real sockets."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import SpiffeId, TrustDomain, WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.bundle.x509_bundle.x509_bundle import X509Bundle
from spiffe.svid.errors import InvalidLeafCertificateError
from spiffe.svid.x509_svid import X509Svid

from devagent.__main__ import main
from devagent.ca import CAError, CertificateAuthority, IssuedCertificate, validate_spiffe_id
from devagent.testing import AgentProcess, running_agent, short_tempdir, start_agent

TD = "spike.internal"
NOW = dt.datetime.now(dt.UTC)
DEFAULT_IDS = {
    "nexus": f"spiffe://{TD}/spike/nexus",
    "pilot": f"spiffe://{TD}/spike/pilot/role/superuser",
    "recover": f"spiffe://{TD}/spike/pilot/role/recover",
    "workload": f"spiffe://{TD}/workload/demo",
}
HEADER = (("workload.spiffe.io", "true"),)


# ------------------------------------------------------------------------- helpers


def _verify_client(
    ca: CertificateAuthority | bytes, leaf: IssuedCertificate, at: dt.datetime | None = None
) -> verification.VerifiedClient:
    roots = _der_certs(ca) if isinstance(ca, bytes) else list(ca.roots)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .time(at or dt.datetime.now(dt.UTC))
        .build_client_verifier()
    )
    return verifier.verify(leaf.certificate, list(leaf.chain))


def _der_certs(der: bytes) -> list[x509.Certificate]:
    """Split concatenated DER certificates (the Workload API bundle format)."""
    return list(X509Bundle.parse_raw(TrustDomain(TD), der).x509_authorities)


def _verify_server(ca: CertificateAuthority, leaf: IssuedCertificate, dns: str) -> None:
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(ca.roots)))
        .build_server_verifier(x509.DNSName(dns))
    )
    verifier.verify(leaf.certificate, list(leaf.chain))


def _stub(channel: grpc.Channel) -> Any:
    """py-spiffe's generated (untyped) Workload API client stub."""
    return workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]


def _assert_spec_leaf(cert: x509.Certificate, spiffe_id: str) -> None:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


# ------------------------------------------------------------------------- CA unit tests


def test_ca_certificate_is_a_spiffe_signing_cert(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    assert ca.trust_domain == TD
    assert _der_certs(ca.bundle_der()) == [cert]


def test_issue_svid_follows_the_x509_svid_spec(ca: CertificateAuthority) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    svid = ca.issue_svid(DEFAULT_IDS["pilot"], ttl=dt.timedelta(seconds=120))
    _assert_spec_leaf(svid.certificate, DEFAULT_IDS["pilot"])
    assert svid.not_before <= before - dt.timedelta(seconds=29)
    assert svid.not_after - svid.not_before <= dt.timedelta(seconds=151)
    client = _verify_client(ca, svid)
    assert x509.UniformResourceIdentifier(DEFAULT_IDS["pilot"]) in (client.subjects or [])
    parsed = X509Svid.parse_raw(svid.cert_chain_der(), svid.key_der())
    assert parsed.spiffe_id == SpiffeId(DEFAULT_IDS["pilot"])


def test_pem_export_is_chain_plus_pkcs8(ca: CertificateAuthority, tmp_path: Path) -> None:
    svid = ca.issue_svid(DEFAULT_IDS["nexus"], dns_names=["nexus.spike.internal"])
    assert svid.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    certs = x509.load_pem_x509_certificates(svid.cert_chain_pem())
    assert certs == [svid.certificate]
    svid.write_pem(tmp_path / "svid.pem", tmp_path / "svid-key.pem")
    assert stat.S_IMODE((tmp_path / "svid-key.pem").stat().st_mode) == 0o600
    parsed = X509Svid.load(
        str(tmp_path / "svid.pem"), str(tmp_path / "svid-key.pem"),
        encoding=serialization.Encoding.PEM,
    )
    assert str(parsed.spiffe_id) == DEFAULT_IDS["nexus"]


def test_expired_leaf_is_rejected_by_a_verifier() -> None:
    ca = CertificateAuthority.generate(TD, not_before=NOW - dt.timedelta(hours=3))
    expired = ca.issue(
        uris=[DEFAULT_IDS["workload"]],
        not_before=NOW - dt.timedelta(hours=2),
        not_after=NOW - dt.timedelta(hours=1),
    )
    assert expired.not_after < dt.datetime.now(dt.UTC)
    with pytest.raises(verification.VerificationError):
        _verify_client(ca, expired)
    # ... while it was fine inside its window
    _verify_client(ca, expired, at=NOW - dt.timedelta(minutes=90))


def test_leaf_with_two_uri_sans(ca: CertificateAuthority) -> None:
    two = ca.issue(uris=[DEFAULT_IDS["pilot"], DEFAULT_IDS["workload"]])
    assert two.uris == [DEFAULT_IDS["pilot"], DEFAULT_IDS["workload"]]
    _verify_client(ca, two)  # a valid certificate chain ...
    with pytest.raises(InvalidLeafCertificateError):  # ... but not an X.509-SVID
        X509Svid.parse_raw(two.cert_chain_der(), two.key_der())


def test_foreign_ca_is_not_trusted(ca: CertificateAuthority) -> None:
    foreign = CertificateAuthority.generate("evil.example")
    assert foreign.trust_domain == "evil.example"
    # a partner CA can mint an ID *in our trust domain* with the raw issue() ...
    forged = foreign.issue(uris=[DEFAULT_IDS["pilot"]])
    with pytest.raises(verification.VerificationError):
        _verify_client(ca, forged)
    _verify_client(foreign, forged)
    # ... but issue_svid keeps a CA inside its own trust domain
    with pytest.raises(CAError, match="not in trust domain"):
        foreign.issue_svid(DEFAULT_IDS["pilot"])


def test_server_svid_without_dns_name_fails_hostname_check(ca: CertificateAuthority) -> None:
    with_dns = ca.issue_svid(DEFAULT_IDS["nexus"], dns_names=["nexus.spike.internal"])
    without = ca.issue_svid(DEFAULT_IDS["nexus"])
    _verify_server(ca, with_dns, "nexus.spike.internal")
    with pytest.raises(verification.VerificationError):
        _verify_server(ca, without, "nexus.spike.internal")


def test_ca_flagged_leaf_and_intermediate_chain(ca: CertificateAuthority) -> None:
    ca_leaf = ca.issue(uris=[DEFAULT_IDS["workload"]], is_ca=True)
    with pytest.raises(InvalidLeafCertificateError):
        X509Svid.parse_raw(ca_leaf.cert_chain_der(), ca_leaf.key_der())
    inter = ca.intermediate()
    leaf = inter.issue_svid(DEFAULT_IDS["workload"])
    assert len(leaf.certificates()) == 2
    assert inter.bundle_der() == ca.bundle_der()
    _verify_client(ca, leaf)
    assert X509Svid.parse_raw(leaf.cert_chain_der(), leaf.key_der()).cert_chain[1] == (
        inter.certificate
    )


def test_ca_without_trust_domain_and_bad_windows() -> None:
    anon = CertificateAuthority.generate(None)
    assert anon.trust_domain is None
    with pytest.raises(CAError):
        anon.issue(not_before=NOW, not_after=NOW - dt.timedelta(seconds=1))
    with pytest.raises(CAError):
        CertificateAuthority(anon.certificate, CertificateAuthority.generate(None).private_key)
    leaf = anon.issue(uris=["spiffe://x.test/a"])
    with pytest.raises(CAError, match="not a CA"):
        CertificateAuthority(leaf.certificate, leaf.private_key)


def test_validate_spiffe_id() -> None:
    assert validate_spiffe_id(DEFAULT_IDS["nexus"], TD) == DEFAULT_IDS["nexus"]
    for bad in ["spiffe://other.test/x", "https://spike.internal/x", "spiffe://spike.internal",
                "spiffe://spike.internal/a/../b", "spiffe://Spike.internal/x"]:
        with pytest.raises(CAError):
            validate_spiffe_id(bad, TD)


def test_ca_persistence(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ca1, status1 = CertificateAuthority.load_or_generate(d, TD)
    ca2, status2 = CertificateAuthority.load_or_generate(d, TD)
    assert (status1, status2) == ("created", "loaded")
    assert ca1.bundle_der() == ca2.bundle_der()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    with pytest.raises(CAError, match="trust domain"):
        CertificateAuthority.load_or_generate(d, "other.test")
    expiring = CertificateAuthority.generate(TD, ttl=dt.timedelta(hours=1))
    expiring.save(d)
    ca3, status3 = CertificateAuthority.load_or_generate(d, TD)
    assert status3 == "renewed" and ca3.bundle_der() != expiring.bundle_der()


# ------------------------------------------------------------------------- CLI input errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--identity", "web"], "expected NAME=SPIFFE_ID"),
        (["--identity", "web=spiffe://other.test/web"], "not in trust domain"),
        (["--identity", "../x=spiffe://spike.internal/x"], "NAME must be"),
        (["--identity", "web=spiffe://spike.internal/web,dns=bad_name!"], "invalid DNS name"),
        (["--identity", "web=spiffe://spike.internal/web,ip=1.2.3.4"], "unknown option"),
        (["--trust-domain", "Bad TD"], "trust domain"),
        (["--nexus-dns=-x-"], "invalid DNS name"),
        (["--no-default-identities"], "no identities"),
    ],
)
def test_bad_input_exits_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = structlog.get_config()
    assert main(["--dir", str(tmp_path / "d"), *args]) == 2
    assert structlog.get_config() == before  # in-process use leaves logging alone
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_bad_ttl_and_long_path_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--dir", str(tmp_path), "--ttl", "1"])
    assert exc.value.code == 2
    assert main(["--dir", str(tmp_path / ("x" * 120))]) == 2
    assert "too long" in capsys.readouterr().err


def test_help_documents_dns_suffix() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "devagent", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert ",dns=" in out and "DEVELOPMENT ONLY" in out and "--nexus-dns" in out


# ------------------------------------------------------------------------- the real agent

TTL = 4  # seconds: rotation every ~2 s


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    parent = short_tempdir()
    proc = start_agent(
        parent / "a",
        ttl=TTL,
        args=["--identity", "web=spiffe://spike.internal/web,dns=web.local"],
    )
    try:
        yield proc
    finally:
        rc = proc.stop()
        sockets = list(proc.directory.glob("*.sock"))
        proc.cleanup()
        os.rmdir(proc.directory)
        os.rmdir(parent)
        assert rc == 0, proc.stderr_text()
        assert sockets == []


def test_files_and_modes(agent: AgentProcess) -> None:
    assert agent.ready_line == f"ready {agent.directory}"
    assert stat.S_IMODE(agent.directory.stat().st_mode) == 0o700
    for name in [*DEFAULT_IDS, "web"]:
        st = agent.socket(name).stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert agent.bundle_path.exists()
    assert "DEVELOPMENT ONLY" in agent.stderr_text()


@pytest.mark.parametrize("name", [*DEFAULT_IDS, "web"])
def test_fetch_x509_context_per_socket(agent: AgentProcess, name: str) -> None:
    client = WorkloadApiClient(socket_path=agent.endpoint(name), default_timeout=5)
    try:
        ctx = client.fetch_x509_context()
    finally:
        client.close()
    svid = ctx.default_svid
    expected = DEFAULT_IDS.get(name, "spiffe://spike.internal/web")
    assert str(svid.spiffe_id) == expected
    leaf = svid.leaf
    _assert_spec_leaf(leaf, expected)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(seconds=TTL + 31)
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TD))
    assert bundle is not None
    (root,) = bundle.x509_authorities
    leaf.verify_directly_issued_by(root)
    pem_roots = x509.load_pem_x509_certificates(agent.bundle_path.read_bytes())
    assert pem_roots == [root]
    dns = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns_names = dns.get_values_for_type(x509.DNSName)
    assert dns_names == {"nexus": ["nexus.spike.internal"], "web": ["web.local"]}.get(name, [])


def test_fetch_x509_bundles(agent: AgentProcess) -> None:
    client = WorkloadApiClient(socket_path=agent.endpoint("workload"), default_timeout=5)
    try:
        bundles = client.fetch_x509_bundles()
    finally:
        client.close()
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TD))
    assert bundle is not None
    assert list(bundle.x509_authorities) == x509.load_pem_x509_certificates(
        agent.bundle_path.read_bytes()
    )


def test_x509_source_sees_rotation(agent: AgentProcess) -> None:
    source = X509Source(socket_path=agent.endpoint("nexus"), timeout_in_seconds=5)
    updated = threading.Event()
    try:
        first = source.get_x509_context().default_svid.leaf.serial_number
        source.subscribe_for_updates(updated.set)
        deadline = time.monotonic() + 15
        rotated = None
        while time.monotonic() < deadline:
            updated.wait(0.25)
            svid = source.get_x509_context().default_svid
            if svid.leaf.serial_number != first:
                rotated = svid
                break
        assert rotated is not None, "no rotated SVID within 15 s"
        assert updated.is_set()
        assert str(rotated.spiffe_id) == DEFAULT_IDS["nexus"]
    finally:
        source.close()


def test_stream_pushes_reissued_svid(agent: AgentProcess) -> None:
    with grpc.insecure_channel(f"unix:{agent.socket('pilot')}") as channel:
        stub = _stub(channel)
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=10)
        first = next(stream)
        second = next(stream)
        stream.cancel()
    a, b = first.svids[0], second.svids[0]
    assert a.spiffe_id == b.spiffe_id == DEFAULT_IDS["pilot"]
    assert a.x509_svid != b.x509_svid and a.bundle == b.bundle
    assert X509Svid.parse_raw(b.x509_svid, b.x509_svid_key).spiffe_id == SpiffeId(
        DEFAULT_IDS["pilot"]
    )


def test_call_without_security_header_is_rejected(agent: AgentProcess) -> None:
    with grpc.insecure_channel(f"unix:{agent.socket('nexus')}") as channel:
        stub = _stub(channel)
        calls: list[tuple[Any, Any, Any]] = [
            (stub.FetchX509SVID, workload_pb2.X509SVIDRequest(), None),
            (stub.FetchX509Bundles, workload_pb2.X509BundlesRequest(), None),
            (stub.FetchX509SVID, workload_pb2.X509SVIDRequest(),
             (("workload.spiffe.io", "false"),)),
        ]
        for method, request, metadata in calls:
            with pytest.raises(grpc.RpcError) as exc:
                next(method(request, metadata=metadata, timeout=5))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert exc.value.details() == "security header missing from request"
        with pytest.raises(grpc.RpcError) as exc:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER,
                              timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_second_agent_on_same_dir_refuses(agent: AgentProcess) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "devagent", "--dir", str(agent.directory)],
        capture_output=True, text=True, timeout=20,
    )
    assert res.returncode == 1
    assert "in use" in res.stderr
    assert agent.socket("nexus").exists()  # the running agent's sockets are untouched
    client = WorkloadApiClient(socket_path=agent.endpoint("nexus"), default_timeout=5)
    try:
        assert str(client.fetch_x509_svid().spiffe_id) == DEFAULT_IDS["nexus"]
    finally:
        client.close()


def test_sigterm_with_open_streams_exits_0_and_removes_sockets() -> None:
    with running_agent(ttl=60) as agent:
        channel = grpc.insecure_channel(f"unix:{agent.socket('workload')}")
        stub = _stub(channel)
        streams = [
            stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30),
            stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=30),
        ]
        for s in streams:
            next(s)  # both streams are now parked in the agent
        t0 = time.monotonic()
        assert agent.stop(timeout=10) == 0, agent.stderr_text()
        assert time.monotonic() - t0 < 5
        assert list(agent.directory.iterdir()) == []  # sockets and bundle.pem removed
        for s in streams:  # the streams ended instead of pinning threads
            with pytest.raises((StopIteration, grpc.RpcError)):
                next(s)
        channel.close()


def test_ca_dir_is_reused_across_restarts() -> None:
    parent = short_tempdir()
    args = ["--ca-dir", str(parent / "ca")]
    try:
        with running_agent(parent / "a1", args=args) as a1:
            bundle1 = a1.bundle_path.read_bytes()
        assert stat.S_IMODE((parent / "ca" / "ca-key.pem").stat().st_mode) == 0o600
        with running_agent(parent / "a2", args=args) as a2:
            assert a2.bundle_path.read_bytes() == bundle1
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# ------------------------------------------------------------------------- grpcio mTLS fit


def _mtls_peer_id(ca: CertificateAuthority, client: IssuedCertificate) -> str | None:
    """Serve one unary method over mTLS with a nexus SVID; return the peer_spiffe_id seen."""
    server_svid = ca.issue_svid(DEFAULT_IDS["nexus"], dns_names=["nexus.spike.internal"])
    seen: list[str | None] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        ids: Any = context.auth_context().get("peer_spiffe_id")  # list of bytes
        seen.append(ids[0].decode() if ids else None)
        return request

    handler = grpc.method_handlers_generic_handler(
        "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(server_svid.key_pem(), server_svid.cert_chain_pem())],
        root_certificates=ca.bundle_pem(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        channel_creds = grpc.ssl_channel_credentials(
            root_certificates=ca.bundle_pem(),
            private_key=client.key_pem(),
            certificate_chain=client.cert_chain_pem(),
        )
        with grpc.secure_channel(
            f"127.0.0.1:{port}",
            channel_creds,
            options=[("grpc.ssl_target_name_override", "nexus.spike.internal")],
        ) as channel:
            echo_call = channel.unary_unary(
                "/t.Echo/Echo", request_serializer=None, response_deserializer=None
            )
            assert echo_call(b"hi", timeout=5) == b"hi"
    finally:
        server.stop(0)
    return seen[0]


def test_svids_work_for_grpc_mtls(ca: CertificateAuthority) -> None:
    pilot = ca.issue_svid(DEFAULT_IDS["pilot"])
    assert _mtls_peer_id(ca, pilot) == DEFAULT_IDS["pilot"]
    # two URI SANs: the handshake succeeds but gRPC reports no SPIFFE ID
    two = ca.issue(uris=[DEFAULT_IDS["pilot"], DEFAULT_IDS["workload"]])
    assert _mtls_peer_id(ca, two) is None
