"""spike/workload.py: SPIKE's own Workload API client (FetchX509SVID only), against py-spiffe's
encoding of the messages and against the real dev agent."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2

from spike.errors import IdentityError
from spike.identity import IdentitySource, fetch_svid
from spike.workload import WorkloadApiError, der_certificates, parse_x509_response
from tests.harness import DevAgent, short_tmpdir


def _response(agent: DevAgent, name: str) -> tuple[bytes, workload_pb2.X509SVIDResponse]:
    """A real answer of the agent, re-encoded by py-spiffe's generated message with a second
    SVID and the fields SPIKE does not read."""
    material = fetch_svid(agent.socket(name))
    chain = b"".join(c.public_bytes(serialization.Encoding.DER)
                     for c in x509.load_pem_x509_certificates(material.cert_chain_pem))
    bundle = b"".join(c.public_bytes(serialization.Encoding.DER)
                      for c in x509.load_pem_x509_certificates(material.bundle_pem))
    key = serialization.load_pem_private_key(material.private_key_pem, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    message = workload_pb2.X509SVIDResponse(
        svids=[workload_pb2.X509SVID(spiffe_id=material.spiffe_id, x509_svid=chain,
                                     x509_svid_key=key, bundle=bundle, hint="first"),
               workload_pb2.X509SVID(spiffe_id="spiffe://other/x", x509_svid=chain,
                                     x509_svid_key=b"k", bundle=bundle)],
        crl=[b"\x01\x02"], federated_bundles={"spiffe://fed": bundle})
    return message.SerializeToString(), message


def test_reads_the_default_svid_as_py_spiffe_encodes_it(agent: DevAgent) -> None:
    raw, message = _response(agent, "nexus")
    svid = parse_x509_response(raw)
    first = message.svids[0]
    assert svid.spiffe_id == first.spiffe_id
    assert b"".join(svid.chain_der) == first.x509_svid
    assert b"".join(svid.bundle_der) == first.bundle
    assert svid.key_der == first.x509_svid_key
    assert "PRIVATE" not in repr(svid) and first.x509_svid_key.hex() not in repr(svid)


def test_every_cut_answer_is_a_workload_api_error_or_parses(agent: DevAgent) -> None:
    raw, _ = _response(agent, "pilot")
    for cut in range(0, len(raw), 7):
        try:
            parse_x509_response(raw[:cut])
        except WorkloadApiError:
            continue


def test_no_svid_and_bad_framing_are_errors() -> None:
    with pytest.raises(WorkloadApiError, match=r"no X\.509-SVID"):
        parse_x509_response(b"")
    with pytest.raises(WorkloadApiError):
        parse_x509_response(b"\x0b")  # wire type 3 (groups) is not used by the API
    with pytest.raises(WorkloadApiError):
        der_certificates(b"\x31\x00")  # not a SEQUENCE
    with pytest.raises(WorkloadApiError):
        der_certificates(b"\x30\x82\x10\x00abc")  # longer than what is there
    assert der_certificates(b"\x30\x01a\x30\x00") == (b"\x30\x01a", b"\x30\x00")


def test_identity_source_follows_reissued_svids() -> None:
    short = DevAgent(ttl=6)
    source = IdentitySource(socket=short.socket("nexus"))
    try:
        first = source.current()
        assert first.spiffe_id == "spiffe://spike.internal/spike/nexus"
        changed = threading.Event()
        source.subscribe(changed.set)
        assert changed.wait(120), "no reissued SVID reached the identity source"
        assert source.current().serial != first.serial
        assert source.current().spiffe_id == first.spiffe_id
    finally:
        source.close()
        short.stop()


def test_a_socket_nobody_answers_on_is_an_identity_error() -> None:
    directory = short_tmpdir("wl-")
    path = Path(directory) / "dead.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # exists, never listens: connections are refused
    try:
        with pytest.raises(IdentityError, match="did not answer with an SVID"):
            fetch_svid(f"unix://{path}", timeout=2.0)
        with pytest.raises(IdentityError, match="no SVID from the Workload API"):
            IdentitySource(socket=f"unix://{path}", timeout=0.5)
    finally:
        dead.close()
        path.unlink()
        directory.rmdir()
