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
