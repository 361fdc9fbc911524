"""A typed client for Nexus: one channel per invocation, one stub per service, on the
connection layer of the workload client library (spike/client.py).

gRPC errors become PilotErrors (:func:`translate`), hence exit codes (``pilot/errors.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import grpc

from pilot import errors
from spike.client import (
    Backoff,
    Channel,
    Connection,
    HandshakeFailed,
    Unavailable,
    UntrustedServer,
    transient,
)
from spike.errors import ERROR_KIND_KEY, ErrorKind, IdentityError
from spike.identity import SvidMaterial, fetch_svid, load_pem_files
from spike.tls import DEFAULT_NEXUS_ADDR, DEFAULT_TLS_NAME

if TYPE_CHECKING:
    from spike.v1.operator_pb2_grpc import OperatorStub
    from spike.v1.policies_pb2_grpc import PoliciesStub
    from spike.v1.secrets_pb2_grpc import SecretsStub

Request = TypeVar("Request")
Response = TypeVar("Response")

DEFAULT_TIMEOUT = 30.0


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


class _PilotIdentity:
    """Pilot's SVID, fetched once per invocation (:func:`load_identity`) on first use."""

    def __init__(self) -> None:
        self._material: SvidMaterial | None = None

    def current(self) -> SvidMaterial:
        if self._material is None:
            self._material = load_identity()
        return self._material


_TRUST_HINT = ("the server at this address is not a trustworthy Nexus; check "
               "--nexus / SPIKE_NEXUS_ADDR and the registration entries")
_TLS_HINT = ("check that Nexus's SVID is from our trust domain and carries the DNS SAN "
             "in SPIKE_NEXUS_TLS_NAME, and that our SVID is valid")
_RUNNING_HINT = "is spike-nexus running? check --nexus / SPIKE_NEXUS_ADDR"


class NexusClient:
    """Pilot's calls on spike.client's connection layer (:class:`spike.client.Connection`:
    identity, the pinned TLS name, the Nexus chain check, channels); what is Pilot's own here
    is the SVID fetched once, the errors as PilotErrors and the retry choice per call."""

    def __init__(self, address: str | None = None, tls_name: str | None = None) -> None:
        self.address = address or os.environ.get("SPIKE_NEXUS_ADDR") or DEFAULT_NEXUS_ADDR
        self.tls_name = tls_name or os.environ.get("SPIKE_NEXUS_TLS_NAME") or DEFAULT_TLS_NAME
        self.connection = Connection(self.address, self.tls_name, _PilotIdentity())
        self._channel: Channel | None = None

    def _open(self) -> Channel:
        """The channel, opened on first use (one per invocation: Pilot's SVID is fixed)."""
        if self._channel is None:
            try:
                self._channel = self.connection.acquire()
            except HandshakeFailed as exc:
                raise errors.Unreachable(str(exc), _TLS_HINT) from None
            except UntrustedServer as exc:
                raise errors.Unreachable(str(exc), _TRUST_HINT) from None
            except Unavailable as exc:
                raise errors.Unreachable(str(exc), _RUNNING_HINT) from None
        return self._channel

    @property
    def channel(self) -> grpc.Channel:
        return self._open().channel

    # One accessor per service; the first use opens the channel.

    @property
    def operator(self) -> OperatorStub:
        return self._open().operator

    @property
    def secrets(self) -> SecretsStub:
        return self._open().secrets

    @property
    def policies(self) -> PoliciesStub:
        return self._open().policies

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as err:
            raise translate(err, self.address) from None

    def call(self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request,
             timeout: float = DEFAULT_TIMEOUT, retry: bool = False) -> Response:
        """One call; with ``retry``, transient failures (a connection closed by Nexus's
        connection age, UNAVAILABLE: ``spike.client.transient``) are retried with
        spike.client's bounded backoff inside ``timeout``. Only for calls that are safe to
        repeat."""
        backoff = Backoff(timeout)
        while True:
            try:
                return method(request, timeout=max(backoff.remaining(), 0.001),
                              wait_for_ready=False)
            except grpc.RpcError as err:
                if not (retry and transient(err)) or not backoff.wait():
                    raise translate(err, self.address) from None

    def close(self) -> None:
        if self._channel is not None:
            self.connection.release(self._channel)
            self._channel = None
        self.connection.close()
