"""The SPIFFE ID and X509-SVID rules, shared by Nexus (its callers) and Pilot (its own SVID).

Nothing here trusts what gRPC core derived from a certificate: grpcio's ``peer_spiffe_id``
is a C string, cut at the first NUL, so a leaf whose URI SAN is
``spiffe://TD/spike/pilot/role/superuser\\0/workload/x`` would read as the superuser.
Callers are identified from the certificate itself, parsed with ``cryptography``, and the ID
is checked against the SPIFFE ID specification, byte by byte, with no normalisation:

- ``spiffe://`` then a trust domain of ``[a-z0-9._-]`` (lower case only; no userinfo, port);
- a path of ``/segment`` parts, each of ``[A-Za-z0-9._-]``, none empty, ``.`` or ``..``
  (so no trailing ``/``, no percent-encoding, query or fragment);
- at most 2048 bytes.

The X509-SVID rules (spec section 4): a leaf has exactly one URI SAN, is not a CA
(``cA=false``) and has neither ``keyCertSign`` nor ``cRLSign``; a certificate between the
leaf and the trust bundle (an intermediate) carries no SPIFFE ID with a path (a workload
SVID must never act as a CA) and no ID of another trust domain.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from spike.errors import IdentityError

MAX_SPIFFE_ID_BYTES = 2048
SCHEME = "spiffe://"

_TRUST_DOMAIN = r"[a-z0-9._-]+"
_SEGMENT = r"[A-Za-z0-9._-]+"
# The whole ID in one match (ASCII only: re.ASCII keeps classes to these bytes).
_SPIFFE_ID = re.compile(rf"spiffe://({_TRUST_DOMAIN})((?:/{_SEGMENT})*)", re.ASCII)


class SvidRuleError(IdentityError):
    """A certificate or ID that breaks the SPIFFE rules. The message never quotes the ID."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" for the trust domain's own ID, else "/a/b"

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse ``value`` by the SPIFFE ID spec; :class:`SvidRuleError` says what is wrong."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        raise SvidRuleError(f"SPIFFE ID longer than {MAX_SPIFFE_ID_BYTES} bytes")
    match = _SPIFFE_ID.fullmatch(value)
    if match is None:
        raise SvidRuleError(_why_invalid(value))
    path = match.group(2)
    if any(segment in (".", "..") for segment in path.split("/")[1:]):
        raise SvidRuleError("SPIFFE ID path has a '.' or '..' segment")
    return SpiffeId(match.group(1), path)


def _why_invalid(value: str) -> str:
    """A precise reason for a refused ID, naming the rule, never the value."""
    if not value.startswith(SCHEME):
        return "not a spiffe:// ID (the scheme must be exactly 'spiffe')"
    rest = value[len(SCHEME):]
    domain, slash, path = rest.partition("/")
    if not domain:
        return "SPIFFE ID has an empty trust domain"
    if not re.fullmatch(_TRUST_DOMAIN, domain, re.ASCII):
        return ("SPIFFE ID trust domain may hold only a-z, 0-9, '.', '-' and '_' "
                "(no upper case, userinfo, port or other characters)")
    if slash and not path:
        return "SPIFFE ID path ends with '/'"
    for segment in path.split("/"):
        if not segment:
            return "SPIFFE ID path has an empty segment"
        if not re.fullmatch(_SEGMENT, segment, re.ASCII):
            return ("SPIFFE ID path segments may hold only A-Z, a-z, 0-9, '.', '-' and '_' "
                    "(no percent-encoding, query, fragment, spaces or control characters)")
    return "invalid SPIFFE ID"


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.value.get_values_for_type(x509.UniformResourceIdentifier)]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signs(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return bool(usage.key_cert_sign or usage.crl_sign)


def leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X509-SVID leaf, after the leaf rules of the spec."""
    uris = _uris(leaf)
    if len(uris) != 1:
        raise SvidRuleError(f"an SVID leaf must carry exactly one URI SAN, it has {len(uris)}")
    spiffe_id = parse_spiffe_id(uris[0])
    if not spiffe_id.path:
        raise SvidRuleError("an SVID leaf's SPIFFE ID must have a path")
    if _is_ca(leaf):
        raise SvidRuleError("an SVID leaf must not be a CA (basicConstraints cA=true)")
    if _signs(leaf):
        raise SvidRuleError("an SVID leaf must not have keyCertSign or cRLSign key usage")
    return spiffe_id


def check_intermediates(intermediates: Sequence[x509.Certificate]) -> frozenset[str]:
    """Refuse signing certificates that are workload SVIDs; return the trust domains named.

    Every certificate presented after the leaf is checked (the peer may send more than
    the path needs; any of them could be the one OpenSSL used). A URI SAN on such a
    certificate must be a SPIFFE ID with no path; the caller compares the returned trust
    domains with its own.
    """
    domains: set[str] = set()
    for cert in intermediates:
        for uri in _uris(cert):
            spiffe_id = parse_spiffe_id(uri)
            if spiffe_id.path:
                raise SvidRuleError(
                    "a certificate in the chain carries a SPIFFE ID with a path "
                    "(a workload SVID acting as a CA)")
            domains.add(spiffe_id.trust_domain)
    return frozenset(domains)


def check_svid_chain(chain: Sequence[x509.Certificate], trust_domain: str) -> SpiffeId:
    """Leaf rules on ``chain[0]``, intermediate rules on the rest, all in ``trust_domain``."""
    if not chain:
        raise SvidRuleError("empty certificate chain")
    spiffe_id = leaf_spiffe_id(chain[0])
    if spiffe_id.trust_domain != trust_domain:
        raise SvidRuleError("the SVID is not in our trust domain")
    if check_intermediates(chain[1:]) - {trust_domain}:
        raise SvidRuleError("a certificate in the chain names another trust domain")
    return spiffe_id


def bounded(value: str, limit: int = 256) -> str:
    """``value`` made safe for a log line: printable ASCII, at most ``limit`` characters."""
    safe = value.encode("ascii", "backslashreplace").decode("ascii")
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in safe)
    if len(safe) > limit:
        return f"{safe[:limit]}...({len(value)} chars)"
    return safe
