"""gRPC mTLS credentials built from SPIFFE identities.

Server side: client certificates are required and verified against our own
trust domain's bundle only (never a federated bundle on this port); gRPC core
then exposes the caller's ID as ``peer_spiffe_id``.

Client side: grpcio cannot check a URI SAN during the handshake, so the Nexus
SVID also carries a DNS SAN (default ``nexus.spike.internal``) that clients pin
with ``grpc.ssl_target_name_override``, trusting only their own bundle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from spike.identity import IdentitySource, SvidMaterial

DEFAULT_TLS_NAME = "nexus.spike.internal"
DEFAULT_NEXUS_ADDR = "127.0.0.1:8553"
DEFAULT_TRUST_DOMAIN = "spike.internal"
# Secrets are bounded at 64 KiB of values; messages carry some overhead, and a
# backup of many generations stays far below this.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def client_channel(address: str, material: SvidMaterial, tls_name: str) -> grpc.Channel:
    """A channel to Nexus that presents our SVID and pins the server's DNS SAN."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=material.bundle_pem,
        private_key=material.private_key_pem,
        certificate_chain=material.cert_chain_pem,
    )
    options = [
        ("grpc.ssl_target_name_override", tls_name),
        ("grpc.default_authority", tls_name),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.secure_channel(address, credentials, options=options)


def server_credentials(source: IdentitySource) -> grpc.ServerCredentials:
    """Credentials that follow SVID rotation: each new handshake uses the newest SVID."""
    first = source.current()
    state = {"serial": first.serial}

    def _configuration(material: SvidMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.private_key_pem, material.cert_chain_pem)],
            root_certificates=material.bundle_pem,
        )

    def _fetch() -> grpc.ServerCertificateConfiguration | None:
        material = source.current()
        if material.serial == state["serial"]:
            return None  # unchanged
        state["serial"] = material.serial
        return _configuration(material)

    # grpcio's fetcher may return None for "unchanged" (the stubs say otherwise).
    fetch: Any = _fetch
    return grpc.dynamic_ssl_server_credentials(
        _configuration(first), fetch, require_client_authentication=True
    )


class ServerSvidError(Exception):
    """Nexus's certificate chain breaks the X509-SVID rules (the message names the rule)."""


def check_server_svid(address: str, bundle_pem: bytes, tls_name: str, trust_domain: str,
                      timeout: float = 5.0) -> None:
    """Apply the X509-SVID rules to the chain Nexus presents, before trusting it with a call.

    grpcio verifies the chain against our bundle and the pinned DNS name, but cannot show
    the chain to Python, so a workload SVID that is (wrongly) a CA could sign a "Nexus"
    certificate it would accept. This makes one TLS 1.3 handshake of its own (no client
    certificate: in TLS 1.3 the server's chain is verified before the client shows one) and
    checks the verified chain: the leaf is ``spiffe://TD/spike/nexus`` by the leaf rules,
    and no certificate above it is a workload SVID or of another trust domain.

    Raises OSError (unreachable), ssl.SSLError (handshake or verification failed) or
    :class:`ServerSvidError`. It checks the server at ``address`` now; it does not bind
    the gRPC connection made afterwards (see docs/security.md).
    """
    import _ssl
    import socket
    import ssl

    from cryptography import x509

    from spike.roles import nexus_id
    from spike.svid import SvidRuleError, check_svid_chain

    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname=tls_name) as tls:
        public = getattr(tls, "get_verified_chain", None)  # public from Python 3.13
        chain_of = public or tls._sslobj.get_verified_chain  # type: ignore[attr-defined]
        der = [cert.public_bytes(_ssl.ENCODING_DER) for cert in chain_of()]
    try:
        chain = [x509.load_der_x509_certificate(d) for d in der]
        spiffe_id = check_svid_chain(chain, trust_domain)
    except (ValueError, SvidRuleError) as exc:
        raise ServerSvidError(f"Nexus's certificate breaks the X509-SVID rules: {exc}") from None
    expected = nexus_id(trust_domain)
    if str(spiffe_id) != expected:
        raise ServerSvidError(f"the server is not Nexus: its SPIFFE ID is {spiffe_id}, "
                              f"not {expected}")
