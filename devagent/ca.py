"""A small X.509 certificate authority for development and tests.

Pure functions and classes only: importing this module starts nothing. The CA issues
X.509-SVIDs that follow the SPIFFE X509-SVID specification (exactly one URI SAN, CA=false,
digitalSignature key usage, serverAuth+clientAuth) and, for tests, arbitrary certificates
that deliberately break it (several URI SANs, already expired, CA flag set, foreign CA ...).

Keys are EC P-256; private keys are exported as unencrypted PKCS#8 (what the Workload API
and grpcio expect).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_BACKDATE",
    "DEFAULT_CA_TTL",
    "DEFAULT_SVID_TTL",
    "CAError",
    "CertificateAuthority",
    "IssuedCertificate",
    "generate_key",
    "validate_spiffe_id",
    "validate_trust_domain",
]

DEFAULT_SVID_TTL = dt.timedelta(hours=1)
DEFAULT_CA_TTL = dt.timedelta(days=7)
DEFAULT_BACKDATE = dt.timedelta(seconds=30)
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"

_ORG = "SPIKE development agent"


class CAError(Exception):
    """Invalid input or unusable CA material."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def validate_trust_domain(trust_domain: str) -> str:
    """Return the normalised trust domain name (``spiffe://`` prefix allowed) or raise CAError."""
    try:
        return TrustDomain(trust_domain).name
    except PySpiffeError as err:
        raise CAError(str(err)) from err


def validate_spiffe_id(spiffe_id: str, trust_domain: str | None = None) -> str:
    """Check a SPIFFE ID (syntax, and membership of ``trust_domain`` when given); return it."""
    try:
        parsed = SpiffeId(spiffe_id)
    except PySpiffeError as err:
        raise CAError(str(err)) from err
    if str(parsed) != spiffe_id:
        raise CAError(
            f"SPIFFE ID {spiffe_id!r} is not in canonical form (expected {str(parsed)!r})"
        )
    if not parsed.path:
        raise CAError(f"SPIFFE ID {spiffe_id!r} has no path; workload IDs need one")
    if trust_domain is not None:
        td = validate_trust_domain(trust_domain)
        if parsed.trust_domain.name != td:
            raise CAError(f"SPIFFE ID {spiffe_id!r} is not in trust domain {td!r}")
    return str(parsed)


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with the given mode (no world-readable window)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate, its private key and the intermediates between it and the root."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def serial_number(self) -> int:
        return self.certificate.serial_number

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def uris(self) -> list[str]:
        """All URI SANs of the certificate (in order)."""
        try:
            san = self.certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return []
        return list(san.get_values_for_type(x509.UniformResourceIdentifier))

    @property
    def spiffe_id(self) -> str:
        """The first URI SAN ('' when there is none)."""
        uris = self.uris
        return uris[0] if uris else ""

    def certificates(self) -> list[x509.Certificate]:
        """Leaf first, then intermediates."""
        return [self.certificate, *self.chain]

    def cert_chain_der(self) -> bytes:
        """DER of the leaf followed by the intermediates, concatenated (Workload API format)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.certificates())

    def cert_chain_pem(self) -> bytes:
        """PEM of the leaf followed by the intermediates."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certificates())

    def key_der(self) -> bytes:
        """Unencrypted PKCS#8 DER private key."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM private key."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write_pem(
        self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
    ) -> None:
        """Write the chain (0644) and the PKCS#8 key (0600) as PEM files."""
        Path(cert_path).write_bytes(self.cert_chain_pem())
        _write_private(Path(key_path), self.key_pem())


def _with_usage_and_names(builder: x509.CertificateBuilder, is_ca: bool, uris: Sequence[str],
                          dns_names: Sequence[str]) -> x509.CertificateBuilder:
    """Key usage for a CA or a leaf (leaves also get EKU serverAuth+clientAuth), then SANs."""
    if is_ca:
        builder = builder.add_extension(_ca_key_usage(), critical=True)
    else:
        builder = builder.add_extension(_leaf_key_usage(), critical=True).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(n) for n in dns_names]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder


class CertificateAuthority:
    """A signing CA: a self-signed root, or an intermediate made with :meth:`intermediate`.

    ``chain`` holds the certificates to send after a leaf it issues (itself and any parent
    intermediates; empty for a root); ``roots`` are the trust anchors (the bundle).
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        chain: Sequence[x509.Certificate] = (),
        roots: Sequence[x509.Certificate] = (),
    ) -> None:
        if certificate.public_key() != private_key.public_key():
            raise CAError("CA private key does not match the CA certificate")
        try:
            bc = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound as err:
            raise CAError("CA certificate has no basicConstraints extension") from err
        if not bc.ca:
            raise CAError("certificate is not a CA (basicConstraints CA=false)")
        self.certificate = certificate
        self.private_key = private_key
        self.chain: tuple[x509.Certificate, ...] = tuple(chain)
        self.roots: tuple[x509.Certificate, ...] = tuple(roots) or (certificate,)

    # ----------------------------------------------------------------- construction

    @classmethod
    def generate(
        cls,
        trust_domain: str | None = "spike.internal",
        *,
        common_name: str | None = None,
        ttl: dt.timedelta = DEFAULT_CA_TTL,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> CertificateAuthority:
        """A new self-signed root CA.

        With a trust domain the CA carries the URI SAN ``spiffe://TD`` (SPIFFE signing-cert
        convention); ``trust_domain=None`` makes a CA with no URI SAN at all.
        """
        td = validate_trust_domain(trust_domain) if trust_domain is not None else None
        key = key or generate_key()
        now = _now()
        nb = not_before or now - DEFAULT_BACKDATE
        na = not_after or now + ttl
        cn = common_name or (f"SPIKE dev CA {td}" if td else "SPIKE dev CA")
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
        )
        if td is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{td}")]
                ),
                critical=False,
            )
        cert = builder.sign(key, hashes.SHA256())
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """Load a root CA from PEM (the first certificate is the CA; the key may be any PEM)."""
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as err:
            raise CAError(f"cannot parse CA material: {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError("CA key is not an EC private key")
        return cls(certs[0], key)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Load ``ca.pem`` and ``ca-key.pem`` written by :meth:`save`."""
        d = Path(directory)
        try:
            cert_pem = (d / CA_CERT_FILE).read_bytes()
            key_pem = (d / CA_KEY_FILE).read_bytes()
        except OSError as err:
            raise CAError(f"cannot read CA from {d}: {err}") from err
        return cls.from_pem(cert_pem, key_pem)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Persist the CA certificate and PKCS#8 key (both 0600) in ``directory`` (0700)."""
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        _write_private(d / CA_KEY_FILE, self.key_pem())
        _write_private(d / CA_CERT_FILE, self.bundle_pem())

    @classmethod
    def load_or_generate(
        cls,
        directory: str | os.PathLike[str],
        trust_domain: str,
        *,
        ttl: dt.timedelta = dt.timedelta(days=365),
        min_remaining: dt.timedelta = dt.timedelta(days=1),
    ) -> tuple[CertificateAuthority, Literal["loaded", "created", "renewed"]]:
        """Reuse the CA persisted in ``directory``, or create (and save) one.

        A stored CA that expires within ``min_remaining`` is replaced ("renewed"); one for
        another trust domain is an error.
        """
        td = validate_trust_domain(trust_domain)
        d = Path(directory)
        if not (d / CA_CERT_FILE).exists() and not (d / CA_KEY_FILE).exists():
            ca = cls.generate(td, ttl=ttl)
            ca.save(d)
            return ca, "created"
        ca = cls.load(d)
        if ca.trust_domain != td:
            raise CAError(
                f"CA in {d} is for trust domain {ca.trust_domain!r}, not {td!r}; "
                "use another --ca-dir or remove it"
            )
        if ca.not_after - _now() < min_remaining:
            ca = cls.generate(td, ttl=ttl)
            ca.save(d)
            return ca, "renewed"
        return ca, "loaded"

    # ----------------------------------------------------------------- properties

    @property
    def trust_domain(self) -> str | None:
        """The trust domain from the CA's ``spiffe://TD`` URI SAN, if any."""
        try:
            san = self.certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return None
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://"):
                try:
                    return TrustDomain(uri).name
                except PySpiffeError:
                    continue
        return None

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    def bundle_der(self) -> bytes:
        """DER of the root certificate(s), concatenated (Workload API bundle format)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.roots)

    def bundle_pem(self) -> bytes:
        """PEM of the root certificate(s)."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)

    def key_pem(self) -> bytes:
        """The CA's unencrypted PKCS#8 PEM private key."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    # ----------------------------------------------------------------- issuing

    def issue(
        self,
        *,
        uris: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        common_name: str | None = None,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
        backdate: dt.timedelta = DEFAULT_BACKDATE,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        is_ca: bool = False,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> IssuedCertificate:
        """Issue any certificate; no SPIFFE rules are enforced (tests need broken ones).

        Validity defaults to ``[now - backdate, now + ttl]``; pass ``not_before`` /
        ``not_after`` for an explicit window (e.g. one entirely in the past). Leaves get
        CA=false, keyUsage digitalSignature+keyEncipherment and EKU serverAuth+clientAuth;
        ``is_ca=True`` gives CA=true and keyCertSign+cRLSign.
        """
        key = key or generate_key()
        now = _now()
        nb = not_before or now - backdate
        na = not_after or now + ttl
        if na <= nb:
            raise CAError("not_after must be later than not_before")
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG)]
        if common_name:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.private_key.public_key()
                ),
                critical=False,
            )
        )
        builder = _with_usage_and_names(builder, is_ca, uris, dns_names)
        cert = builder.sign(self.private_key, hashes.SHA256())
        return IssuedCertificate(cert, key, self.chain)

    def issue_svid(
        self,
        spiffe_id: str,
        *,
        dns_names: Sequence[str] = (),
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
        backdate: dt.timedelta = DEFAULT_BACKDATE,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> IssuedCertificate:
        """Issue a spec-conforming X.509-SVID for ``spiffe_id`` (must be in the CA's domain).

        The validity never extends past the CA's own ``notAfter``.
        """
        validate_spiffe_id(spiffe_id, self.trust_domain)
        now = _now()
        not_after = min(now + ttl, self.not_after)
        if not_after <= now:
            raise CAError("the CA certificate has expired")
        return self.issue(
            uris=[spiffe_id],
            dns_names=dns_names,
            not_before=max(now - backdate, self.certificate.not_valid_before_utc),
            not_after=not_after,
            key=key,
        )

    def intermediate(
        self,
        trust_domain: str | None = None,
        *,
        ttl: dt.timedelta = DEFAULT_CA_TTL,
    ) -> CertificateAuthority:
        """A subordinate CA signed by this one (its leaves carry the intermediate chain)."""
        td = validate_trust_domain(trust_domain) if trust_domain else self.trust_domain
        uris = [f"spiffe://{td}"] if td else []
        issued = self.issue(
            uris=uris, common_name="SPIKE dev intermediate CA", ttl=ttl, is_ca=True
        )
        return CertificateAuthority(
            issued.certificate,
            issued.private_key,
            chain=(issued.certificate, *self.chain),
            roots=self.roots,
        )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
