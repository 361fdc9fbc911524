"""SPIFFE identity: X.509-SVIDs from the Workload API or from PEM files.

Both Nexus and Pilot turn an identity into :class:`SvidMaterial`, the PEM
bytes that grpcio wants. Nexus keeps a long-lived :class:`IdentitySource`
that follows SVID rotation; Pilot fetches once per invocation
(:func:`fetch_svid`), failing fast with the real cause.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from spike.errors import IdentityError
from spike.svid import SvidRuleError, check_svid_chain, leaf_spiffe_id

if TYPE_CHECKING:
    from spiffe import X509Source

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"


@dataclass(frozen=True)
class SvidMaterial:
    """One X.509-SVID with its trust bundle, as PEM (the key as PKCS#8)."""

    spiffe_id: str
    cert_chain_pem: bytes
    private_key_pem: bytes
    bundle_pem: bytes
    not_after: datetime
    serial: int
    dns_names: tuple[str, ...]

    def __repr__(self) -> str:  # never show the private key
        return f"SvidMaterial(spiffe_id={self.spiffe_id!r}, serial={self.serial:x})"


def _sans(cert: x509.Certificate, kind: type[x509.UniformResourceIdentifier | x509.DNSName]
          ) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.value.get_values_for_type(kind)]


def uri_sans(cert: x509.Certificate) -> list[str]:
    return _sans(cert, x509.UniformResourceIdentifier)


def dns_sans(cert: x509.Certificate) -> list[str]:
    return _sans(cert, x509.DNSName)


def material_from_pem(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> SvidMaterial:
    """Build :class:`SvidMaterial` from PEM bytes, checking the chain by the SVID rules."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        bundle = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as exc:
        raise IdentityError(f"cannot parse SVID PEM material: {type(exc).__name__}") from None
    if not chain or not bundle:
        raise IdentityError("SVID PEM material: empty certificate chain or trust bundle")
    leaf = chain[0]
    try:
        # The X509-SVID rules, in the leaf's own trust domain (the same rules Nexus
        # applies to its callers): one valid SPIFFE ID, not a CA, no workload SVID above.
        spiffe_id = check_svid_chain(chain, leaf_spiffe_id(leaf).trust_domain)
    except SvidRuleError as exc:
        raise IdentityError(f"the SVID breaks the X509-SVID rules: {exc}") from None
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SvidMaterial(
        spiffe_id=str(spiffe_id),
        cert_chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        private_key_pem=pkcs8,
        bundle_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle),
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        dns_names=tuple(dns_sans(leaf)),
    )


def _material_from_context(context: Any) -> SvidMaterial:
    """Convert a py-spiffe ``X509Context`` (default SVID + own trust domain bundle)."""
    svid = context.default_svid
    if svid is None:
        raise IdentityError("the Workload API returned no X.509-SVID for this workload")
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if bundle is None:
        raise IdentityError("the Workload API returned no trust bundle for our trust domain")
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    key_pem = svid.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    bundle_pem = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in bundle.x509_authorities
    )
    return material_from_pem(chain_pem, key_pem, bundle_pem)


def endpoint_socket(explicit: str | None = None) -> str:
    """The Workload API address (``unix:///path``), checked to exist."""
    addr = explicit or os.environ.get(ENDPOINT_ENV, "")
    if not addr:
        raise IdentityError(
            f"no SPIFFE identity: set {ENDPOINT_ENV}=unix:///path/to/agent.sock "
            "(or use PEM files)"
        )
    if not addr.startswith("unix://"):
        raise IdentityError(f"{ENDPOINT_ENV} must be a unix:// address, got {addr!r}")
    path = addr.removeprefix("unix://")
    if not Path(path).exists():
        raise IdentityError(
            f"Workload API socket {path} does not exist: is the SPIRE agent "
            "(or spike-dev-agent) running?"
        )
    return addr


def fetch_svid(socket: str | None = None, timeout: float = 5.0) -> SvidMaterial:
    """Fetch the current SVID once (for short-lived programs such as Pilot)."""
    addr = endpoint_socket(socket)
    from spiffe import WorkloadApiClient

    try:
        client = WorkloadApiClient(socket_path=addr, default_timeout=timeout)
    except Exception as exc:
        raise IdentityError(f"cannot reach the Workload API at {addr}: {exc}") from None
    try:
        context = client.fetch_x509_context()
    except Exception as exc:
        raise IdentityError(
            f"the Workload API at {addr} did not answer with an SVID: {exc}"
        ) from None
    finally:
        client.close()
    return _material_from_context(context)


def load_pem_files(cert: Path, key: Path, bundle: Path) -> SvidMaterial:
    try:
        return material_from_pem(cert.read_bytes(), key.read_bytes(), bundle.read_bytes())
    except OSError as exc:
        raise IdentityError(f"cannot read SVID PEM file: {exc.filename}: {exc.strerror}") from None


class IdentitySource:
    """A long-lived identity that follows rotation (Workload API stream or PEM files).

    ``current()`` returns the newest material; ``subscribe(cb)`` calls ``cb``
    after each change. PEM files are re-read when their mtime changes (checked
    at most every ``poll_seconds`` from ``current()``).
    """

    def __init__(
        self,
        *,
        socket: str | None = None,
        pem_files: tuple[Path, Path, Path] | None = None,
        timeout: float = 10.0,
        poll_seconds: float = 2.0,
    ) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[], None]] = []
        self._x509_source: X509Source | None = None
        self._pem_files = pem_files
        self._poll_seconds = poll_seconds
        self._pem_mtimes: tuple[float, ...] = ()
        self._last_poll = 0.0
        if pem_files is not None:
            self._material = load_pem_files(*pem_files)
            self._pem_mtimes = self._mtimes()
            return
        addr = endpoint_socket(socket)
        from spiffe import X509Source

        try:
            self._x509_source = X509Source(socket_path=addr, timeout_in_seconds=timeout)
        except Exception as exc:
            raise IdentityError(f"no SVID from the Workload API at {addr}: {exc}") from None
        self._material = _material_from_context(self._x509_source.get_x509_context())
        self._x509_source.subscribe_for_updates(self._on_update)

    def _mtimes(self) -> tuple[float, ...]:
        assert self._pem_files is not None
        try:
            return tuple(p.stat().st_mtime_ns for p in self._pem_files)
        except OSError:
            return self._pem_mtimes

    def _on_update(self) -> None:
        assert self._x509_source is not None
        try:
            material = _material_from_context(self._x509_source.get_x509_context())
        except Exception:  # keep serving the last good SVID
            return
        self._set(material)

    def _set(self, material: SvidMaterial) -> None:
        with self._lock:
            self._material = material
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback()

    def current(self) -> SvidMaterial:
        if self._pem_files is not None:
            import time

            now = time.monotonic()
            if now - self._last_poll >= self._poll_seconds:
                self._last_poll = now
                mtimes = self._mtimes()
                if mtimes != self._pem_mtimes:
                    self._pem_mtimes = mtimes
                    # Half-written files: keep the last good SVID.
                    with contextlib.suppress(IdentityError):
                        self._set(load_pem_files(*self._pem_files))
        with self._lock:
            return self._material

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def close(self) -> None:
        if self._x509_source is not None:
            self._x509_source.close()
