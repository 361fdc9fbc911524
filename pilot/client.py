"""A typed client for Nexus: one channel per invocation, one stub per service.

gRPC errors become PilotErrors (:func:`translate`), hence exit codes (``pilot/errors.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import grpc

from pilot import errors
from spike.errors import ERROR_KIND_KEY, ErrorKind, IdentityError
from spike.identity import SvidMaterial, fetch_svid, load_pem_files
from spike.tls import (
    DEFAULT_NEXUS_ADDR,
    DEFAULT_TLS_NAME,
    ServerSvidError,
    check_server_svid,
    client_channel,
)

if TYPE_CHECKING:
    from spike.v1.operator_pb2_grpc import OperatorStub
    from spike.v1.policies_pb2_grpc import PoliciesStub
    from spike.v1.secrets_pb2_grpc import SecretsStub

Request = TypeVar("Request")
Response = TypeVar("Response")

DEFAULT_TIMEOUT = 30.0
RETRY_FIRST_PAUSE = 0.05
RETRY_MAX_PAUSE = 1.0


def load_identity() -> SvidMaterial:
    cert = os.environ.get("SPIKE_SVID_CERT")
    key = os.environ.get("SPIKE_SVID_KEY")
    bundle = os.environ.get("SPIKE_TRUST_BUNDLE")
    try:
        if cert or key or bundle:
            if not (cert and key and bundle):
                raise errors.UsageError(
                    "SPIKE_SVID_CERT, SPIKE_SVID_KEY and SPIKE_TRUST_BUNDLE go together"
                )
            return load_pem_files(Path(cert), Path(key), Path(bundle))
        return fetch_svid(timeout=float(os.environ.get("SPIKE_AGENT_TIMEOUT", "5")))
    except IdentityError as exc:
        raise errors.IdentityUnavailable(
            str(exc),
            "start the SPIRE agent (or `spike-dev-agent --dir DIR`) and set "
            "SPIFFE_ENDPOINT_SOCKET=unix:///DIR/pilot.sock",
        ) from None


def _kind(err: grpc.RpcError) -> str:
    call = cast("grpc.Call", err)  # what a stub raises is also a Call: trailers are pairs
    try:
        for key, value in call.trailing_metadata() or ():
            if key == ERROR_KIND_KEY:
                return str(value)
    except Exception:  # noqa: S110 - no trailers on transport errors
        pass
    return ""


def translate(err: grpc.RpcError, address: str) -> errors.PilotError:
    """The PilotError (hence the exit code) for a failed call: by the kind Nexus named
    (``errors.KIND_ANSWERS``), else by the status code."""
    code = err.code()
    detail = err.details() or ""
    kind = _kind(err)
    if kind:
        try:
            known = ErrorKind(kind)
        except ValueError:  # a kind from a newer Nexus: its message says what went wrong
            return _by_status(code, detail, address, nexus_message=True)
        return errors.from_kind(known, code.name, detail)
    return _by_status(code, detail, address)


def _by_status(code: grpc.StatusCode, detail: str, address: str,
               nexus_message: bool = False) -> errors.PilotError:
    if code == grpc.StatusCode.UNAVAILABLE and not nexus_message:
        lowered = detail.lower()
        tls_words = ("ssl", "handshake", "certificate", "verification", "tls")
        if any(word in lowered for word in tls_words):
            return errors.Unreachable(
                f"TLS handshake with Nexus at {address} failed: {detail}",
                "check that Nexus's SVID is from our trust domain and carries the DNS SAN "
                "in SPIKE_NEXUS_TLS_NAME, and that our SVID is valid",
            )
        return errors.Unreachable(
            f"Nexus at {address} is unreachable: {detail}",
            "is spike-nexus running? check --nexus / SPIKE_NEXUS_ADDR",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.Unreachable(f"Nexus at {address} did not answer in time", "")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return errors.PermissionDenied(f"permission denied: {detail}", errors.PERMISSION_HINT)
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.NotFound(detail)
    if code == grpc.StatusCode.ABORTED:
        return errors.Conflict(detail)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.UsageError(detail)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return errors.PilotError(f"this Nexus does not implement that call yet: {detail}")
    return errors.from_status(code.name, detail, nexus_message)


class NexusClient:
    def __init__(self, address: str | None = None, tls_name: str | None = None) -> None:
        self.address = address or os.environ.get("SPIKE_NEXUS_ADDR") or DEFAULT_NEXUS_ADDR
        self.tls_name = tls_name or os.environ.get("SPIKE_NEXUS_TLS_NAME") or DEFAULT_TLS_NAME
        self._channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            material = load_identity()
            self._check_server(material)
            self._channel = client_channel(self.address, material, self.tls_name)
        return self._channel

    def _check_server(self, material: SvidMaterial) -> None:
        """The X509-SVID rules on Nexus's chain (grpcio cannot show it to us)."""
        import ssl

        trust_domain = material.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        try:
            check_server_svid(self.address, material.bundle_pem, self.tls_name, trust_domain)
        except ServerSvidError as exc:
            raise errors.Unreachable(
                str(exc), "the server at this address is not a trustworthy Nexus; check "
                "--nexus / SPIKE_NEXUS_ADDR and the registration entries") from None
        except ssl.SSLError as exc:
            raise errors.Unreachable(
                f"TLS handshake with Nexus at {self.address} failed: {exc.reason or exc}",
                "check that Nexus's SVID is from our trust domain and carries the DNS SAN "
                "in SPIKE_NEXUS_TLS_NAME, and that our SVID is valid") from None
        except (OSError, ValueError) as exc:
            raise errors.Unreachable(
                f"Nexus at {self.address} is unreachable: {exc}",
                "is spike-nexus running? check --nexus / SPIKE_NEXUS_ADDR") from None

    # One accessor per service; the first use opens the channel.

    @cached_property
    def operator(self) -> OperatorStub:
        from spike.v1.operator_pb2_grpc import OperatorStub

        return OperatorStub(self.channel)

    @cached_property
    def secrets(self) -> SecretsStub:
        from spike.v1.secrets_pb2_grpc import SecretsStub

        return SecretsStub(self.channel)

    @cached_property
    def policies(self) -> PoliciesStub:
        from spike.v1.policies_pb2_grpc import PoliciesStub

        return PoliciesStub(self.channel)

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as err:
            raise translate(err, self.address) from None

    def call(self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request,
             timeout: float = DEFAULT_TIMEOUT, retry: bool = False) -> Response:
        """One call; with ``retry``, transient failures (a connection closed by Nexus's
        connection age, UNAVAILABLE: ``spike.client.transient``) are retried with bounded
        backoff inside ``timeout``. Only for calls that are safe to repeat."""
        from spike.client import transient

        deadline = time.monotonic() + timeout
        pause = RETRY_FIRST_PAUSE
        while True:
            try:
                return method(request, timeout=max(deadline - time.monotonic(), 0.001),
                              wait_for_ready=False)
            except grpc.RpcError as err:
                if not (retry and transient(err)) or time.monotonic() + pause >= deadline:
                    raise translate(err, self.address) from None
            time.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_PAUSE)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
