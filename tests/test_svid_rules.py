"""SPIFFE ID and X509-SVID rules: the parser, and a real Nexus probed with hand-made certificates.

The probe uses bare grpcio channels (not Pilot, which refuses malformed SVIDs of its own), with
leaves issued by the dev agent's own CA: every malformed one must be refused before any
servicer runs, and the audit must never name the identity the certificate pretends to be.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import SpiffeId

from devagent.ca import CertificateAuthority, IssuedCertificate
from spike.errors import IdentityError
from spike.identity import material_from_pem
from spike.svid import (
    MAX_SPIFFE_ID_BYTES,
    SvidRuleError,
    bounded,
    check_svid_chain,
    parse_spiffe_id,
)
from spike.v1 import operator_pb2, operator_pb2_grpc
from tests.harness import DevAgent, Nexus, audit_events

TD = "spike.internal"
SUPERUSER = f"spiffe://{TD}/spike/pilot/role/superuser"
TLS_NAME = "nexus.spike.internal"

VALID = [
    f"spiffe://{TD}/workload/demo",
    "spiffe://a/b",
    "spiffe://td-1.example_x/A.b-c_d/0",
    f"spiffe://{TD}/" + "a" * (MAX_SPIFFE_ID_BYTES - len(f"spiffe://{TD}/")),
]
INVALID = [
    f"{SUPERUSER}\0/workload/x",       # the NUL that grpcio's peer_spiffe_id cuts at
    f"spiffe://{TD}/a/../b",
    f"spiffe://{TD}/a/./b",
    f"spiffe://{TD}/%73uperuser",
    f"spiffe://{TD}/a?q",
    f"spiffe://{TD}/a#f",
    f"spiffe://{TD}/a/",
    f"spiffe://{TD}//a",
    f"spiffe://{TD}/a b",
    f"spiffe://{TD}/a\nb",
    f"spiffe://{TD}/caf\u00e9",
    f"spiffe://user@{TD}/a",
    f"spiffe://{TD}:443/a",
    "spiffe://Spike.Internal/a",
    f"SPIFFE://{TD}/a",
    "spiffe:///a",
    "spiffe://a\n/a",  # py-spiffe admits it
    "spiffe://",
    f"https://{TD}/a",
    f"spiffe://{TD}/" + "a" * (MAX_SPIFFE_ID_BYTES + 1 - len(f"spiffe://{TD}/")),
]


@pytest.mark.parametrize("value", VALID)
def test_valid_ids_parse_to_themselves(value: str) -> None:
    assert str(parse_spiffe_id(value)) == value


@pytest.mark.parametrize("value", INVALID)
def test_invalid_ids_are_refused_without_being_quoted(value: str) -> None:
    with pytest.raises(SvidRuleError) as info:
        parse_spiffe_id(value)
    assert value not in str(info.value)
    assert "\0" not in str(info.value) and "\n" not in str(info.value)


_ID_ALPHABET = st.sampled_from([*list("abzAZ09.-_/%?#@: \x00\n"), "é", "//", ".."])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_ID_ALPHABET, max_size=40).map(lambda parts: "spiffe://" + "".join(parts)))
def test_parser_agrees_with_py_spiffe(value: str) -> None:
    """Where py-spiffe does not normalise (it lower-cases), both accept the same IDs.

    One known difference: py-spiffe admits a newline at the end of the trust domain or of a
    path segment ('spiffe://a/b\\n', 'spiffe://a\\n/b'; its patterns end in '$'), which the
    spec and we refuse.
    """
    try:
        theirs: str | None = str(SpiffeId(value))
    except Exception:
        theirs = None
    try:
        ours: str | None = str(parse_spiffe_id(value))
    except SvidRuleError:
        ours = None
    if ours is not None:
        assert theirs == value
    elif theirs is not None and theirs == value:
        segments = value.removeprefix("spiffe://").split("/")
        assert any(segment.endswith("\n") for segment in segments), value


def test_bounded_keeps_log_fields_short_and_printable() -> None:
    text = bounded("spiffe://x/" + "\0\n\x1b" + "y" * 5000, limit=64)
    assert len(text) < 100 and text.isprintable()
    assert "chars)" in text


# ---------------------------------------------------------------- hand-made certificates


def _leaf_builder(ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey) -> Any:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "probe")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
    )


def leaf_with_key_usage(ca: CertificateAuthority, uri: str, *, cert_sign: bool,
                        crl_sign: bool) -> IssuedCertificate:
    """A CA=false leaf that nevertheless has keyCertSign and/or cRLSign."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=crl_sign, encipher_only=False, decipher_only=False)
    cert = (
        _leaf_builder(ca, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return IssuedCertificate(cert, key, ca.chain)


def workload_acting_as_ca(ca: CertificateAuthority, workload_id: str) -> IssuedCertificate:
    """A CA=true workload SVID (with a path) that signs a superuser leaf."""
    rogue = ca.issue(uris=[workload_id], is_ca=True)
    rogue_ca = CertificateAuthority(rogue.certificate, rogue.private_key,
                                    chain=(rogue.certificate, *ca.chain), roots=ca.roots)
    return rogue_ca.issue(uris=[SUPERUSER])


def malformed_leaves(ca: CertificateAuthority) -> dict[str, IssuedCertificate]:
    foreign_intermediate = ca.intermediate("elsewhere.example")
    return {
        "nul-in-san": ca.issue(uris=[f"{SUPERUSER}\0/workload/x"]),
        "ca-true-leaf": ca.issue(uris=[SUPERUSER], is_ca=True),
        "keycertsign-leaf": leaf_with_key_usage(ca, SUPERUSER, cert_sign=True, crl_sign=False),
        "crlsign-leaf": leaf_with_key_usage(ca, SUPERUSER, cert_sign=False, crl_sign=True),
        "signed-by-workload-ca": workload_acting_as_ca(ca, f"spiffe://{TD}/workload/x"),
        "intermediate-of-another-domain": foreign_intermediate.issue(uris=[SUPERUSER]),
        "two-uri-sans": ca.issue(uris=[SUPERUSER, f"spiffe://{TD}/workload/demo"]),
        "dns-only": ca.issue(dns_names=["superuser.spike.internal"]),
        "dot-dot": ca.issue(uris=[f"spiffe://{TD}/spike/pilot/role/x/../superuser"]),
        "percent-encoded": ca.issue(uris=[f"spiffe://{TD}/spike/pilot/role/%73uperuser"]),
        "trailing-slash": ca.issue(uris=[f"{SUPERUSER}/"]),
        "query": ca.issue(uris=[f"{SUPERUSER}?q"]),
        "fragment": ca.issue(uris=[f"{SUPERUSER}#f"]),
        "newline": ca.issue(uris=[f"{SUPERUSER}\n"]),
        "upper-case-domain": ca.issue(uris=["spiffe://SPIKE.internal/spike/pilot/role/superuser"]),
        "trust-domain-only": ca.issue(uris=[f"spiffe://{TD}"]),
        "too-long": ca.issue(uris=[f"{SUPERUSER}/" + "a" * MAX_SPIFFE_ID_BYTES]),
    }


@pytest.fixture(scope="module")
def dev_ca(agent: DevAgent, agent_ca_dir: Path) -> CertificateAuthority:
    del agent  # the agent creates the CA in agent_ca_dir
    return CertificateAuthority.load(agent_ca_dir)


@pytest.fixture(scope="module")
def sealed_nexus(agent: DevAgent) -> Iterator[Nexus]:
    from tests.harness import short_tmpdir

    running = Nexus(short_tmpdir("nxs-"), agent.env("nexus"))
    yield running
    running.stop()


def bare_status(nexus: Nexus, ca: CertificateAuthority,
                leaf: IssuedCertificate) -> grpc.RpcError | None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.bundle_pem(), private_key=leaf.key_pem(),
        certificate_chain=leaf.cert_chain_pem())
    with grpc.secure_channel(nexus.address, creds,
                             options=[("grpc.ssl_target_name_override", TLS_NAME)]) as channel:
        try:
            operator_pb2_grpc.OperatorStub(channel).Status(operator_pb2.StatusRequest(), timeout=20)
        except grpc.RpcError as err:
            return err
    return None


def test_a_well_formed_superuser_leaf_is_admitted(sealed_nexus: Nexus,
                                                  dev_ca: CertificateAuthority) -> None:
    """The control: the same probe with a correct leaf gets Status."""
    assert bare_status(sealed_nexus, dev_ca, dev_ca.issue_svid(SUPERUSER)) is None
    intermediate = dev_ca.intermediate()
    assert bare_status(sealed_nexus, dev_ca, intermediate.issue_svid(SUPERUSER)) is None


MALFORMED = sorted(malformed_leaves(CertificateAuthority.generate(TD)))


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_svids_are_refused_by_nexus(sealed_nexus: Nexus, dev_ca: CertificateAuthority,
                                              name: str) -> None:
    leaf = malformed_leaves(dev_ca)[name]
    before = len(audit_events(sealed_nexus.data_dir))
    err = bare_status(sealed_nexus, dev_ca, leaf)
    assert err is not None, f"{name}: Nexus answered Status"
    # Refused by the SVID rules before the RPC table is even consulted.
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.code(), err.details())
    details = err.details() or ""
    assert "\0" not in details and len(details) < 1024
    # Whatever this call left in the trail never names the superuser.
    new = audit_events(sealed_nexus.data_dir)[before:]
    assert all(e.get("caller") != SUPERUSER for e in new), new
    assert [e["caller"] for e in new if e["action"] == "rpc.denied"] == ["(none)"], new


@pytest.mark.parametrize("name", ["nul-in-san", "ca-true-leaf", "keycertsign-leaf",
                                  "signed-by-workload-ca", "two-uri-sans", "dns-only",
                                  "dot-dot", "percent-encoded"])
def test_pilot_refuses_the_same_svids_as_its_own(dev_ca: CertificateAuthority, name: str) -> None:
    leaf = malformed_leaves(dev_ca)[name]
    with pytest.raises(IdentityError, match=r"breaks the X509-SVID rules"):
        material_from_pem(leaf.cert_chain_pem(), leaf.key_pem(), dev_ca.bundle_pem())


def test_chain_rules_in_process() -> None:
    ca = CertificateAuthority.generate(TD)
    good = ca.intermediate().issue_svid(SUPERUSER)
    assert str(check_svid_chain(good.certificates(), TD)) == SUPERUSER
    rogue = workload_acting_as_ca(ca, f"spiffe://{TD}/workload/x")
    with pytest.raises(SvidRuleError, match="workload SVID acting as a CA"):
        check_svid_chain(rogue.certificates(), TD)
    with pytest.raises(SvidRuleError, match="trust domain"):
        check_svid_chain(good.certificates(), "other.example")


# ---------------------------------------------------------------- Pilot checks Nexus's chain


class _AnswersStatus(operator_pb2_grpc.OperatorServicer):
    def Status(self, request: Any, context: Any) -> Any:
        return operator_pb2.StatusResponse()


def rogue_server(ca: CertificateAuthority, leaf: IssuedCertificate) -> tuple[grpc.Server, str]:
    """A server that is not Nexus, with a chain grpcio accepts for the pinned DNS name."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # Only Status is served (the stubs call the base class abstract; grpcio does not).
    operator_pb2_grpc.add_OperatorServicer_to_server(_AnswersStatus(), server)  # type: ignore[abstract]
    creds = grpc.ssl_server_credentials([(leaf.key_pem(), leaf.cert_chain_pem())],
                                        root_certificates=ca.bundle_pem(),
                                        require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, f"127.0.0.1:{port}"


def nexus_leaf_signed_by_workload_ca(ca: CertificateAuthority) -> IssuedCertificate:
    rogue = ca.issue(uris=[f"spiffe://{TD}/workload/x"], is_ca=True)
    rogue_ca = CertificateAuthority(rogue.certificate, rogue.private_key,
                                    chain=(rogue.certificate, *ca.chain), roots=ca.roots)
    return rogue_ca.issue(uris=[f"spiffe://{TD}/spike/nexus"], dns_names=[TLS_NAME])


@pytest.mark.parametrize("case", ["signed-by-workload-ca", "workload-with-nexus-dns-name"])
def test_pilot_refuses_a_server_whose_chain_breaks_the_rules(
        agent: DevAgent, dev_ca: CertificateAuthority, case: str) -> None:
    from tests.harness import pilot

    leaf = (nexus_leaf_signed_by_workload_ca(dev_ca) if case == "signed-by-workload-ca"
            else dev_ca.issue_svid(f"spiffe://{TD}/workload/demo", dns_names=[TLS_NAME]))
    server, address = rogue_server(dev_ca, leaf)
    try:
        result = pilot(["status"], agent.env("pilot"), address, timeout=60)
    finally:
        server.stop(None)
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    expected = ("breaks the X509-SVID rules" if case == "signed-by-workload-ca"
                else "the server is not Nexus")
    assert expected in result.stderr, result.stderr
