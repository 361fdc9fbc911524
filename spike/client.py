"""The client library for workloads: read and write secrets in Nexus over mutual TLS.

::

    import spike

    with spike.Client() as client:
        creds = client.get("apps/db/creds")

Configured from the same environment as Pilot (``SPIFFE_ENDPOINT_SOCKET``, or
``SPIKE_SVID_CERT`` / ``SPIKE_SVID_KEY`` / ``SPIKE_TRUST_BUNDLE``; ``SPIKE_NEXUS_ADDR``,
``SPIKE_NEXUS_TLS_NAME``); keyword arguments override it. One ``Client`` may be shared by
threads. It follows SVID rotation: the identity is a long-lived
:class:`spike.identity.IdentitySource` (py-spiffe's ``X509Source`` on the Workload API), and
when its SVID changes the next call opens a new channel with the new SVID (grpcio has no
client-side certificate callback); calls still running on the old channel finish there.

Retries (bounded exponential backoff, always inside the call's deadline): reads (``get``,
``list``, ``metadata``) after any transient failure (UNAVAILABLE, a connection closed by
Nexus's connection age: "Socket closed", GOAWAY). A transient failure of a write cannot tell
whether Nexus applied it, so writes are retried only where a repeat is harmless:
``put(..., cas=N)`` (at most one attempt can match ``N``; if an earlier attempt was in fact
applied the retry raises :class:`Conflict` with ``after_retry=True``) and ``delete`` with
explicit versions. ``put`` without ``cas`` and ``delete()`` of the current version are sent
once; the channel waits for a connection before sending (``wait_for_ready``), so a Nexus that
is briefly unreachable still gets them. See docs/client.md.

Errors are :class:`ClientError` subclasses (under :class:`spike.errors.SpikeError`), chosen
by the ``spike-error-kind`` Nexus names (every :class:`~spike.errors.ErrorKind` maps to one),
else by the status code. Messages name paths, never a secret value.
"""

from __future__ import annotations

import builtins
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import grpc

from spike.errors import ERROR_KIND_KEY, ErrorKind, SpikeError
from spike.identity import IdentitySource, SvidMaterial
from spike.tls import (
    DEFAULT_NEXUS_ADDR,
    DEFAULT_TLS_NAME,
    ServerSvidError,
    check_server_svid,
    client_channel,
)

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    from spike.v1 import secrets_pb2 as pb
    from spike.v1.operator_pb2_grpc import OperatorStub
    from spike.v1.policies_pb2_grpc import PoliciesStub
    from spike.v1.secrets_pb2_grpc import SecretsStub

Request = TypeVar("Request")
Response = TypeVar("Response")

DEFAULT_TIMEOUT = 10.0
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 1.0
# Transport words of a connection that Nexus (or the network) closed under a call.
_CLOSED_WORDS = ("socket closed", "goaway", "stream removed", "rst_stream", "connection reset",
                 "broken pipe", "keepalive", "max connection age")


# ------------------------------------------------------------------------------- errors


class ClientError(SpikeError):
    """A call to Nexus failed. ``kind`` is what Nexus named (None for transport failures),
    ``code`` the gRPC status code's name."""

    def __init__(self, message: str, kind: ErrorKind | None = None, code: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.after_retry = False


class NotFound(ClientError):
    """No such secret (or no such version)."""


class PermissionDenied(ClientError):
    """No policy grants this identity the permission, or Nexus refused our SVID."""


class Sealed(ClientError):
    """Nexus does not hold the root key (run `spike recover`), so it serves no secrets."""


class Uninitialized(Sealed):
    """Nexus has no root key yet (run `spike init`)."""


class Conflict(ClientError):
    """A check-and-set write did not match the current version."""


class Unavailable(ClientError):
    """Nexus could not be reached or did not answer within the deadline, or is busy."""


class InvalidArgument(ClientError):
    """Nexus refused the request's form (path grammar, sizes, versions)."""


class UntrustedServer(ClientError):
    """The server's certificate chain is not a valid Nexus X509-SVID of our trust domain."""


class HandshakeFailed(UntrustedServer):
    """The TLS handshake with the server failed (so its chain could not be trusted)."""


# Every ErrorKind -> the exception it raises (tests/test_client.py checks it is complete).
KIND_ERRORS: dict[ErrorKind, type[ClientError]] = {
    ErrorKind.NOT_FOUND: NotFound,
    ErrorKind.PERMISSION_DENIED: PermissionDenied,
    ErrorKind.UNAUTHENTICATED: PermissionDenied,
    ErrorKind.SEALED: Sealed,
    ErrorKind.UNINITIALIZED: Uninitialized,
    ErrorKind.CONFLICT: Conflict,
    ErrorKind.UNAVAILABLE: Unavailable,
    ErrorKind.BACKOFF: Unavailable,
    ErrorKind.STORE: Unavailable,
    ErrorKind.INVALID_ARGUMENT: InvalidArgument,
    ErrorKind.PASSWORD_REJECTED: InvalidArgument,
    ErrorKind.ERROR: ClientError,
    ErrorKind.STALE: ClientError,
    ErrorKind.ALREADY_INITIALIZED: ClientError,
    ErrorKind.ALREADY_UNSEALED: ClientError,
    ErrorKind.WRONG_PASSWORD: ClientError,
    ErrorKind.BACKUP_INVALID: ClientError,
    ErrorKind.OLD_PASSWORD_BACKUP: ClientError,
    ErrorKind.INTEGRITY: ClientError,
    ErrorKind.METADATA_INTEGRITY: ClientError,
    ErrorKind.INTERNAL: ClientError,
}

_STATUS_ERRORS: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
}


def error_kind(err: grpc.RpcError) -> ErrorKind | None:
    """The ``spike-error-kind`` Nexus set on a refusal (None: none, or one we do not know)."""
    call = cast("grpc.Call", err)  # what a stub raises is also a Call
    try:
        for key, value in call.trailing_metadata() or ():
            if key == ERROR_KIND_KEY:
                return ErrorKind(str(value))
    except Exception:  # noqa: S110 - no trailers on transport errors; an unknown kind
        pass
    return None


def translate(err: grpc.RpcError, address: str) -> ClientError:
    """The ClientError for a failed call: by the kind Nexus named, else by the status code."""
    code = err.code()
    detail = err.details() or ""
    kind = error_kind(err)
    if kind is not None:
        return KIND_ERRORS[kind](detail, kind, code.name)
    cls = _STATUS_ERRORS.get(code, ClientError)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return cls(f"Nexus at {address} did not answer in time", None, code.name)
    if cls is Unavailable or _closed(err):
        return Unavailable(f"Nexus at {address} is unavailable: {detail}", None, code.name)
    return cls(detail or code.name, None, code.name)


def _closed(err: grpc.RpcError) -> bool:
    """A transport failure that is a connection closed under the call (no Nexus answer)."""
    if error_kind(err) is not None:
        return False
    detail = (err.details() or "").lower()
    return any(word in detail for word in _CLOSED_WORDS)


def transient(err: grpc.RpcError) -> bool:
    """Worth another attempt: Nexus never answered this call (or said it is unavailable)."""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return error_kind(err) in (None, ErrorKind.UNAVAILABLE)
    return _closed(err)


# ------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class VersionInfo:
    version: int
    created: datetime | None
    deleted: datetime | None
    destroyed: bool


@dataclass(frozen=True)
class SecretMetadata:
    """A secret's versions and times (no values)."""

    path: str
    current_version: int
    oldest_version: int
    created: datetime | None
    updated: datetime | None
    versions: tuple[VersionInfo, ...]
    max_versions: int


def _time(message: pb.SecretMetadataResponse | pb.SecretVersionInfo, field: str
          ) -> datetime | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    stamp = cast("Timestamp", getattr(message, field))
    return stamp.ToDatetime(tzinfo=UTC)


def _metadata(resp: pb.SecretMetadataResponse) -> SecretMetadata:
    versions = tuple(
        VersionInfo(v.version, _time(v, "created"), _time(v, "deleted"), v.destroyed)
        for v in resp.versions)
    return SecretMetadata(resp.path, resp.current_version, resp.oldest_version,
                          _time(resp, "created"), _time(resp, "updated"), versions,
                          resp.max_versions)


# ------------------------------------------------------------------------------- channels


class Identity(Protocol):
    """Where SVIDs come from: :class:`spike.identity.IdentitySource`, or anything with
    ``current()`` (Pilot fetches its SVID once per invocation)."""

    def current(self) -> SvidMaterial: ...


class Channel:
    """One channel with the SVID it presents and a stub per service; closed once retired
    and no counted call uses it."""

    def __init__(self, channel: grpc.Channel, serial: int) -> None:
        self.channel = channel
        self.serial = serial
        self.users = 0
        self.retired = False

    @cached_property
    def secrets(self) -> SecretsStub:
        from spike.v1.secrets_pb2_grpc import SecretsStub

        return SecretsStub(self.channel)

    @cached_property
    def operator(self) -> OperatorStub:
        from spike.v1.operator_pb2_grpc import OperatorStub

        return OperatorStub(self.channel)

    @cached_property
    def policies(self) -> PoliciesStub:
        from spike.v1.policies_pb2_grpc import PoliciesStub

        return PoliciesStub(self.channel)


class Connection:
    """The connection layer both clients share (spike.Client and Pilot's NexusClient).

    Channels to Nexus at ``address`` pinned to ``tls_name``, with the SVID of ``identity``;
    before a new channel is used, Nexus's chain is checked against the X509-SVID rules
    (spike/tls.py; grpcio cannot show it to us). When the identity's SVID changes, the next
    :meth:`acquire` opens a new channel with the new SVID; calls still running on the old one
    finish there. Thread-safe. Failures of the check raise :class:`UntrustedServer`
    (:class:`HandshakeFailed` when TLS itself failed) or :class:`Unavailable`.
    """

    def __init__(self, address: str, tls_name: str, identity: Identity) -> None:
        self.address = address
        self.tls_name = tls_name
        self.identity = identity
        self._lock = threading.Lock()
        self._current: Channel | None = None
        self._closed = False

    def acquire(self, timeout: float | None = None) -> Channel:
        """The channel for a call (counted until :meth:`release`); ``timeout`` bounds the
        chain check of a new channel (None: spike.tls's default)."""
        material = self.identity.current()
        with self._lock:
            if self._closed:
                raise ClientError("the client is closed")
            current = self._current
            if current is None or current.serial != material.serial:
                self._check_server(material, timeout)
                fresh = Channel(client_channel(self.address, material, self.tls_name),
                                material.serial)
                if current is not None:
                    self._retire(current)
                self._current = current = fresh
            current.users += 1
            return current

    def release(self, conn: Channel) -> None:
        with self._lock:
            conn.users -= 1
            if conn.retired and conn.users == 0:
                conn.channel.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            current, self._current = self._current, None
            if current is not None:
                self._retire(current)

    def _retire(self, conn: Channel) -> None:
        conn.retired = True
        if conn.users == 0:
            conn.channel.close()

    def _check_server(self, material: SvidMaterial, timeout: float | None) -> None:
        trust_domain = material.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        extra = {} if timeout is None else {"timeout": max(timeout, 0.1)}
        try:
            check_server_svid(self.address, material.bundle_pem, self.tls_name, trust_domain,
                              **extra)
        except ServerSvidError as exc:
            raise UntrustedServer(str(exc)) from None
        except ssl.SSLError as exc:
            raise HandshakeFailed(
                f"TLS handshake with Nexus at {self.address} failed: {exc.reason or exc}"
            ) from None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"Nexus at {self.address} is unreachable: {exc}") from None


class Backoff:
    """Bounded exponential backoff (with jitter) inside one call's deadline."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self._next = _FIRST_BACKOFF

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def wait(self) -> bool:
        """Pause before another attempt; False (no pause) when it would pass the deadline."""
        pause = min(self._next, _MAX_BACKOFF) * (0.5 + random.random() / 2)
        if time.monotonic() + pause >= self.deadline:
            return False
        time.sleep(pause)
        self._next *= 2
        return True


def _pem_files_from_env() -> tuple[Path, Path, Path] | None:
    names = ("SPIKE_SVID_CERT", "SPIKE_SVID_KEY", "SPIKE_TRUST_BUNDLE")
    values = [os.environ.get(name, "") for name in names]
    if not any(values):
        return None
    if not all(values):
        raise SpikeError("SPIKE_SVID_CERT, SPIKE_SVID_KEY and SPIKE_TRUST_BUNDLE go together")
    return Path(values[0]), Path(values[1]), Path(values[2])


class Client:
    """A thread-safe client for Nexus's secrets API (see the module docstring)."""

    def __init__(self, address: str | None = None, *, tls_name: str | None = None,
                 socket: str | None = None, pem_files: tuple[Path, Path, Path] | None = None,
                 identity: IdentitySource | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        """``socket``: the Workload API (``unix:///...``); ``pem_files``: (cert, key,
        bundle); ``identity``: an IdentitySource to share (not closed by this client)."""
        self.address = address or os.environ.get("SPIKE_NEXUS_ADDR") or DEFAULT_NEXUS_ADDR
        self.tls_name = tls_name or os.environ.get("SPIKE_NEXUS_TLS_NAME") or DEFAULT_TLS_NAME
        self.timeout = timeout
        self._own_identity = identity is None
        if identity is None:
            files = pem_files if pem_files is not None or socket else _pem_files_from_env()
            identity = IdentitySource(socket=socket, pem_files=files)
        self._identity = identity
        self._connection = Connection(self.address, self.tls_name, identity)

    # --- lifecycle

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()
        if self._own_identity:
            self._identity.close()

    @property
    def svid(self) -> SvidMaterial:
        """The SVID new connections present (its ``serial`` changes with each re-issue)."""
        return self._identity.current()

    # --- calls

    def _call(self, pick: Callable[[SecretsStub], grpc.UnaryUnaryMultiCallable[Request,
                                                                                Response]],
              request: Request, timeout: float | None, retry: bool) -> Response:
        """One call with retries of transient failures (when ``retry``) inside its deadline."""
        backoff = Backoff(self.timeout if timeout is None else timeout)
        retried = False
        while True:
            try:
                return self._attempt(pick, request, backoff.remaining())
            except _Transient as failure:
                error = failure.error
            except ClientError as exc:
                exc.after_retry = retried
                raise
            if not retry or not backoff.wait():
                error.after_retry = retried
                raise error
            retried = True

    def _attempt(self, pick: Callable[[SecretsStub], grpc.UnaryUnaryMultiCallable[Request,
                                                                                   Response]],
                 request: Request, remaining: float) -> Response:
        if remaining <= 0:
            raise Unavailable(f"Nexus at {self.address} did not answer in time")
        try:
            conn = self._connection.acquire(remaining)
        except Unavailable as exc:
            raise _Transient(exc) from None
        try:
            return pick(conn.secrets)(request, timeout=remaining, wait_for_ready=True)
        except grpc.RpcError as err:
            error = translate(err, self.address)
            if transient(err):
                raise _Transient(error) from None
            raise error from None
        finally:
            self._connection.release(conn)

    # --- the secrets API

    def get(self, path: str, version: int | None = None, *, timeout: float | None = None
            ) -> dict[str, str]:
        """The data of ``path`` (its current version, or ``version``)."""
        from spike.v1 import secrets_pb2 as pb

        resp = self._call(lambda s: s.Get, pb.GetSecretRequest(path=path, version=version or 0),
                          timeout, retry=True)
        return dict(resp.data)

    def put(self, path: str, data: Mapping[str, str], cas: int | None = None, *,
            timeout: float | None = None) -> int:
        """Write a new version; its number. ``cas``: only if the current version is ``cas``
        (0: only if the secret does not exist). Retried after transient failures only with
        ``cas`` (see the module docstring)."""
        from spike.v1 import secrets_pb2 as pb

        request = pb.PutSecretRequest(path=path, data=dict(data))
        if cas is not None:
            if cas < 0:
                raise InvalidArgument("cas must be >= 0")
            request.cas = cas
        resp = self._call(lambda s: s.Put, request, timeout, retry=cas is not None)
        return resp.version

    def list(self, prefix: str = "", *, page_size: int = 0, timeout: float | None = None
             ) -> builtins.list[str]:
        """Every path under ``prefix`` this identity may list, in order (all pages; the
        timeout applies to each page; ``page_size`` 0: Nexus's default)."""
        return builtins.list(self.iter_paths(prefix, page_size=page_size, timeout=timeout))

    def iter_paths(self, prefix: str = "", *, page_size: int = 0,
                   timeout: float | None = None) -> Iterator[str]:
        """The paths of :meth:`list`, page by page."""
        from spike.v1 import secrets_pb2 as pb

        token = ""
        while True:
            resp = self._call(lambda s: s.List,
                              pb.ListSecretsRequest(prefix=prefix, page_size=page_size,
                                                    page_token=token),
                              timeout, retry=True)
            yield from resp.paths
            token = resp.next_page_token
            if not token:
                return

    def delete(self, path: str, versions: Sequence[int] = (), *,
               timeout: float | None = None) -> None:
        """Soft-delete ``versions`` of ``path`` (none given: the current one)."""
        from spike.v1 import secrets_pb2 as pb

        request = pb.DeleteSecretRequest(path=path, versions=builtins.list(versions))
        self._call(lambda s: s.Delete, request, timeout, retry=bool(versions))

    def metadata(self, path: str, *, timeout: float | None = None) -> SecretMetadata:
        """The versions and times of ``path``."""
        from spike.v1 import secrets_pb2 as pb

        resp = self._call(lambda s: s.Metadata, pb.SecretMetadataRequest(path=path), timeout,
                          retry=True)
        return _metadata(resp)


class _Transient(Exception):  # an internal signal of _attempt, never escapes
    def __init__(self, error: ClientError) -> None:
        super().__init__(str(error))
        self.error = error
