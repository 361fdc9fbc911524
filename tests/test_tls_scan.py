"""Nexus's TLS surface, scanned from the outside: protocols, cipher suites, client auth.

Two independent views of the same real Nexus (dev agent SVIDs, mTLS port):

* sslyze, an external TLS scanner. It pins ``cryptography<47`` while this project needs
  ``cryptography>=50``, so it cannot live in the project's virtualenv: the test builds a
  throwaway virtualenv for it under /tmp and runs its CLI with a client certificate.
  Without PyPI that test is skipped locally; under ``CI`` it fails instead, because CI reaches
  PyPI and a security scan that silently stops running is worse than a red build.
* Python's ``ssl`` module (OpenSSL 3), always: legacy protocol versions offered with
  ``@SECLEVEL=0`` (proven offerable against a local control server first), every TLS 1.2
  cipher suite this OpenSSL knows tried one at a time, and handshakes without a client
  certificate.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spike.identity import fetch_svid
from spike.tls import DEFAULT_TLS_NAME
from tests.harness import DevAgent, Nexus, base_env, short_tmpdir

SSLYZE_REQUIREMENT = "sslyze~=6.3"
# Legacy OpenSSL needs the security level lowered before it offers TLS 1.0/1.1 or weak suites.
EVERYTHING = "ALL:COMPLEMENTOFALL:@SECLEVEL=0"
TIMEOUT = 5.0


@dataclass
class Target:
    host: str
    port: int
    cert: Path  # a Pilot SVID chain (the client certificate)
    key: Path
    bundle: Path
    nexus_cert: Path  # Nexus's own SVID, for the local control server
    nexus_key: Path


@pytest.fixture(scope="module")
def target(agent: DevAgent) -> Iterator[Target]:
    data_dir = short_tmpdir("nx-")
    pem_dir = short_tmpdir("tls-")
    nexus = Nexus(data_dir, agent.env("nexus"))
    try:
        client = fetch_svid(agent.socket("pilot"))
        server = fetch_svid(agent.socket("nexus"))
        files = {
            "cert": client.cert_chain_pem, "key": client.private_key_pem,
            "bundle": client.bundle_pem, "nexus_cert": server.cert_chain_pem,
            "nexus_key": server.private_key_pem,
        }
        paths = {}
        for name, pem in files.items():
            path = pem_dir / f"{name}.pem"
            path.write_bytes(pem)
            path.chmod(0o600)
            paths[name] = path
        host, port = nexus.address.rsplit(":", 1)
        yield Target(host=host, port=int(port), **paths)
    finally:
        nexus.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(pem_dir, ignore_errors=True)


def client_context(
    target: Target,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    with_cert: bool = True,
) -> ssl.SSLContext:
    """A client that verifies Nexus (our bundle + the pinned DNS name), like Pilot does."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(target.bundle))
    if with_cert:
        ctx.load_cert_chain(str(target.cert), str(target.key))
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])  # as gRPC clients do
    return ctx


def handshake(ctx: ssl.SSLContext, host: str, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw, server_hostname=DEFAULT_TLS_NAME)
    except BaseException:
        raw.close()
        raise


def accepts(ctx: ssl.SSLContext, host: str, port: int) -> bool:
    try:
        with handshake(ctx, host, port):
            return True
    except (ssl.SSLError, ConnectionError):
        return False


# --- Python ssl module ---------------------------------------------------------------------


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def first_http2_frame(tls: ssl.SSLSocket) -> bytes:
    """Speak HTTP/2 like a gRPC client; b"" when the server hangs up instead of answering."""
    tls.sendall(HTTP2_PREFACE)
    return tls.recv(9)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_client_with_certificate_gets_http2_settings(
    target: Target, version: ssl.TLSVersion
) -> None:
    """The positive control for everything below: a proper client gets a gRPC server."""
    with handshake(client_context(target, version), target.host, target.port) as tls:
        assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                 ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        assert tls.selected_alpn_protocol() == "h2"
        frame = first_http2_frame(tls)
    assert len(frame) == 9 and frame[3] == 0x4, frame  # an HTTP/2 SETTINGS frame


@pytest.fixture(scope="module")
def legacy_control(target: Target) -> Iterator[tuple[str, int]]:
    """A local TLS server that accepts TLS 1.0 and 1.1, to prove this client can offer them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers(EVERYTHING)
    ctx.load_cert_chain(str(target.nexus_cert), str(target.nexus_key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(TIMEOUT)
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[:2]
    stop.set()
    thread.join(5)
    listener.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1],
                         ids=["TLSv1.0", "TLSv1.1"])
def test_legacy_tls_versions_refused(
    target: Target, legacy_control: tuple[str, int], version: ssl.TLSVersion
) -> None:
    ctx = client_context(target, version, ciphers=EVERYTHING)
    if not accepts(ctx, *legacy_control):
        pytest.skip(f"this OpenSSL cannot offer {version.name} even at @SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(ctx, target.host, target.port).close()


def forward_secret_aead(name: str) -> bool:
    """OpenSSL names: ECDHE key exchange and an AEAD (GCM or ChaCha20-Poly1305), nothing else."""
    return name.startswith("ECDHE-") and ("-GCM-" in name or name.endswith("CHACHA20-POLY1305"))


def test_tls12_offers_only_ecdhe_aead_suites(target: Target) -> None:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.set_ciphers(EVERYTHING)
    suites = sorted({c["name"] for c in probe.get_ciphers() if c["protocol"] == "TLSv1.2"})
    assert len(suites) > 50, suites  # CBC, RSA key exchange, DHE, PSK, CCM, ARIA, ... all tried
    accepted = [
        name for name in suites
        if accepts(client_context(target, ssl.TLSVersion.TLSv1_2, ciphers=f"{name}:@SECLEVEL=0"),
                   target.host, target.port)
    ]
    assert accepted, "no TLS 1.2 suite accepted at all"
    assert all(forward_secret_aead(name) for name in accepted), accepted


def test_client_certificate_required(target: Target) -> None:
    # TLS 1.2: the server's CertificateRequest is answered with no certificate -> handshake fails.
    ctx12 = client_context(target, ssl.TLSVersion.TLSv1_2, with_cert=False)
    with pytest.raises(ssl.SSLError):
        handshake(ctx12, target.host, target.port).close()
    # TLS 1.3: the client's (empty) Certificate follows the server's Finished, so the handshake
    # "completes" on the client side; the refusal shows as a hang-up (or an alert) where the
    # control test above receives the server's SETTINGS frame.
    ctx13 = client_context(target, ssl.TLSVersion.TLSv1_3, with_cert=False)
    try:
        with handshake(ctx13, target.host, target.port) as tls:
            frame = first_http2_frame(tls)
    except (ssl.SSLError, ConnectionError):
        frame = b""
    assert frame == b"", f"Nexus answered a TLS 1.3 client without a certificate: {frame!r}"


# --- sslyze --------------------------------------------------------------------------------


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"sslyze unavailable under CI: {reason}")
    pytest.skip(f"sslyze unavailable: {reason}")


@pytest.fixture(scope="module")
def sslyze() -> Iterator[list[str]]:
    """The sslyze CLI from its own throwaway virtualenv (its cryptography pin clashes with ours)."""
    home = short_tmpdir("sz-")
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(home / "venv")
        python = home / "venv" / "bin" / "python"
        env = {k: v for k, v in base_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        try:
            result = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 SSLYZE_REQUIREMENT],
                env=env, capture_output=True, text=True, timeout=240,
            )
        except subprocess.TimeoutExpired:
            _fail_or_skip("pip install timed out")
        if result.returncode != 0:
            _fail_or_skip(f"pip install {SSLYZE_REQUIREMENT} failed: {result.stderr[-2000:]}")
        yield [str(python), "-m", "sslyze"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_sslyze(command: list[str], target: Target, *options: str) -> dict[str, object]:
    out = short_tmpdir("sz-") / "scan.json"
    try:
        result = subprocess.run(
            [*command, "--sni", DEFAULT_TLS_NAME, "--mozilla_config", "disable",
             "--json_out", str(out), *options,
             f"{DEFAULT_TLS_NAME}:{target.port}{{{target.host}}}"],
            capture_output=True, text=True, timeout=120,
        )
        assert out.exists(), (result.returncode, result.stdout, result.stderr)
        scan = json.loads(out.read_text())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    (server,) = scan["server_scan_results"]
    return server  # type: ignore[no-any-return]


def test_sslyze_scan(sslyze: list[str], target: Target) -> None:
    server = run_sslyze(
        sslyze, target, "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
        "--cert", str(target.cert), "--key", str(target.key), "--keyform", "PEM",
    )
    assert server["connectivity_status"] == "COMPLETED", server.get("connectivity_error_trace")
    results = server["scan_result"]
    assert isinstance(results, dict)

    def scanned(key: str) -> dict[str, Any]:
        entry = results[key]
        assert entry["status"] == "COMPLETED", (key, entry)
        return entry["result"]  # type: ignore[no-any-return]

    for legacy in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        found = scanned(f"{legacy}_cipher_suites")
        assert found["is_tls_version_supported"] is False, (legacy, found["accepted_cipher_suites"])
        assert found["accepted_cipher_suites"] == []

    tls12 = scanned("tls_1_2_cipher_suites")
    assert tls12["is_tls_version_supported"] is True
    accepted = tls12["accepted_cipher_suites"]
    assert isinstance(accepted, list) and accepted
    for entry in accepted:
        suite = entry["cipher_suite"]
        name = suite["name"]  # IANA names
        assert name.startswith("TLS_ECDHE_"), name
        assert name.endswith(("_GCM_SHA256", "_GCM_SHA384", "_CHACHA20_POLY1305_SHA256")), name
        assert not any(bad in name for bad in ("_CBC_", "NULL", "EXPORT", "RC4", "_anon_")), name
        assert suite["is_anonymous"] is False, name
        assert entry["ephemeral_key"] is not None, name  # forward secrecy: an ephemeral key

    tls13 = scanned("tls_1_3_cipher_suites")
    assert tls13["is_tls_version_supported"] is True
    assert tls13["accepted_cipher_suites"]

    # No client certificate: sslyze cannot even complete its connectivity check.
    anonymous = run_sslyze(sslyze, target, "--tlsv1_2")
    assert anonymous["connectivity_status"] == "ERROR", anonymous["connectivity_status"]

    print("sslyze TLS 1.2 accepted:", [e["cipher_suite"]["name"] for e in accepted],
          "TLS 1.3 accepted:", [e["cipher_suite"]["name"] for e in tls13["accepted_cipher_suites"]],
          file=sys.stderr)
