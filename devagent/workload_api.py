"""The SPIFFE Workload API servicer of the development agent, and SVID rotation.

One :class:`SvidStore` holds the current X.509-SVID of every identity, re-issues them at half
their TTL and wakes every waiting ``FetchX509SVID`` stream. One gRPC server per identity
listens on ``DIR/NAME.sock``; the socket a call arrives on decides the identity it gets.

Uses py-spiffe's generated stubs (the Workload API proto has no package, so a second compiled
copy in the same process would collide).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
import structlog
from spiffe._proto import workload_pb2, workload_pb2_grpc

from devagent.ca import DEFAULT_BACKDATE, CertificateAuthority, IssuedCertificate

__all__ = [
    "HEADER_MISSING_MESSAGE",
    "WORKLOAD_API_HEADER",
    "AgentServers",
    "Identity",
    "SocketInUseError",
    "SvidStore",
    "WorkloadApiServicer",
    "x509_svid_response",
]

WORKLOAD_API_HEADER = "workload.spiffe.io"
HEADER_MISSING_MESSAGE = "security header missing from request"

# How often a waiting stream re-checks that its client is still there, in case a
# cancellation callback was missed. Cancellation normally wakes it at once.
_POLL_SECONDS = 1.0

Logger = Any  # structlog's BoundLogger is dynamically typed


@dataclass(frozen=True)
class Identity:
    """A socket name and the SVID it serves."""

    name: str
    spiffe_id: str
    dns_names: tuple[str, ...] = field(default_factory=tuple)


class SvidStore:
    """Current SVIDs of all identities; rotation; wake-ups for waiting streams."""

    def __init__(
        self,
        ca: CertificateAuthority,
        identities: Sequence[Identity],
        *,
        ttl: dt.timedelta,
        backdate: dt.timedelta = DEFAULT_BACKDATE,
        log: Logger | None = None,
    ) -> None:
        if ttl <= dt.timedelta(0):
            raise ValueError("ttl must be positive")
        self.ca = ca
        self.identities = {i.name: i for i in identities}
        self.ttl = ttl
        self.backdate = backdate
        self._log: Logger = log if log is not None else structlog.get_logger("devagent")
        self._cond = threading.Condition()
        self._svids: dict[str, IssuedCertificate] = {}
        self._generation = 0
        self._issued_at = 0.0  # time.monotonic() of the last issue
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.bundle_der = ca.bundle_der()
        self.issue_all()

    # ---------------------------------------------------------------- issuing

    def issue_all(self) -> None:
        """Issue fresh SVIDs for every identity and wake all streams."""
        fresh = {
            name: self.ca.issue_svid(
                ident.spiffe_id, dns_names=ident.dns_names, ttl=self.ttl, backdate=self.backdate
            )
            for name, ident in self.identities.items()
        }
        with self._cond:
            self._svids = fresh
            self._generation += 1
            self._issued_at = time.monotonic()
            self._cond.notify_all()
        for name, svid in fresh.items():
            self._log.info(
                "svid_issued",
                identity=name,
                spiffe_id=svid.spiffe_id,
                serial=format(svid.serial_number, "x"),
                not_after=svid.not_after.isoformat(),
            )

    def current(self, name: str) -> tuple[int, IssuedCertificate]:
        """The generation number and the current SVID of identity ``name``."""
        with self._cond:
            return self._generation, self._svids[name]

    @property
    def stopped(self) -> bool:
        with self._cond:
            return self._stopped

    def wait_newer(
        self, name: str, generation: int, is_active: Callable[[], bool]
    ) -> tuple[int, IssuedCertificate] | None:
        """Block until a generation newer than ``generation`` exists (return it), or until the
        store stops or ``is_active()`` turns false (return None)."""
        with self._cond:
            while True:
                if self._stopped or not is_active():
                    return None
                if self._generation != generation:
                    return self._generation, self._svids[name]
                self._cond.wait(_POLL_SECONDS)

    def wait_done(self, is_active: Callable[[], bool]) -> None:
        """Block until the store stops or ``is_active()`` turns false."""
        with self._cond:
            while not self._stopped and is_active():
                self._cond.wait(_POLL_SECONDS)

    def wake(self) -> None:
        """Wake every waiter so it re-checks its condition (e.g. its client went away)."""
        with self._cond:
            self._cond.notify_all()

    # ---------------------------------------------------------------- rotation

    def _rotation_loop(self) -> None:
        half = self.ttl.total_seconds() / 2
        while True:
            with self._cond:
                while not self._stopped:
                    remaining = self._issued_at + half - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopped:
                    return
            try:
                self.issue_all()
            except Exception:  # keep serving the old SVIDs; retry shortly
                self._log.exception("svid_rotation_failed")
                with self._cond:
                    self._cond.wait(min(half, 5.0))

    def start(self) -> None:
        """Start the rotation thread (re-issues at half the TTL)."""
        self._thread = threading.Thread(
            target=self._rotation_loop, name="svid-rotation", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop rotating and release every waiting stream."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def x509_svid_response(svid: IssuedCertificate, bundle_der: bytes) -> workload_pb2.X509SVIDResponse:
    """The Workload API message for one SVID."""
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=svid.spiffe_id,
                x509_svid=svid.cert_chain_der(),
                x509_svid_key=svid.key_der(),
                bundle=bundle_der,
            )
        ]
    )


class WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """The Workload API for one identity (the socket it is served on)."""

    def __init__(self, store: SvidStore, name: str, log: Logger | None = None) -> None:
        self._store = store
        self._name = name
        self._identity = store.identities[name]
        base: Logger = log if log is not None else structlog.get_logger("devagent")
        self._log = base.bind(identity=name)

    # ---------------------------------------------------------------- helpers

    def _check_header(self, context: grpc.ServicerContext, method: str) -> None:
        md = dict(context.invocation_metadata())
        if md.get(WORKLOAD_API_HEADER) != "true":
            self._log.warning("request_rejected", method=method, reason=HEADER_MISSING_MESSAGE)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, HEADER_MISSING_MESSAGE)

    def _watch(self, context: grpc.ServicerContext) -> Callable[[], bool]:
        """Wake the store's waiters when this RPC ends; return its liveness check."""
        context.add_callback(self._store.wake)
        return context.is_active

    def _unimplemented(self, context: grpc.ServicerContext, method: str) -> NoReturn:
        self._check_header(context, method)
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not implemented by spike-dev-agent (X.509-SVIDs only)",
        )

    # ---------------------------------------------------------------- X.509

    def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.ServicerContext
    ) -> Iterator[workload_pb2.X509SVIDResponse]:
        self._check_header(context, "FetchX509SVID")
        is_active = self._watch(context)
        generation, svid = self._store.current(self._name)
        self._log.debug("stream_opened", method="FetchX509SVID", peer=context.peer())
        try:
            while True:
                yield x509_svid_response(svid, self._store.bundle_der)
                nxt = self._store.wait_newer(self._name, generation, is_active)
                if nxt is None:
                    return
                generation, svid = nxt
        finally:
            self._log.debug("stream_closed", method="FetchX509SVID")

    def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: grpc.ServicerContext
    ) -> Iterator[workload_pb2.X509BundlesResponse]:
        self._check_header(context, "FetchX509Bundles")
        is_active = self._watch(context)
        td = self._store.ca.trust_domain
        key = f"spiffe://{td}" if td else self._identity.spiffe_id.split("/", 3)[2]
        yield workload_pb2.X509BundlesResponse(bundles={key: self._store.bundle_der})
        # The CA never changes while the agent runs: hold the stream open until done.
        self._store.wait_done(is_active)

    # ---------------------------------------------------------------- JWT (not offered)

    def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: grpc.ServicerContext
    ) -> workload_pb2.JWTSVIDResponse:
        self._unimplemented(context, "FetchJWTSVID")

    def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: grpc.ServicerContext
    ) -> Iterator[workload_pb2.JWTBundlesResponse]:
        self._unimplemented(context, "FetchJWTBundles")

    def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: grpc.ServicerContext
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        self._unimplemented(context, "ValidateJWTSVID")


class SocketInUseError(RuntimeError):
    """Another process already serves on the socket path."""


def _socket_is_live(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class AgentServers:
    """One sync gRPC server per identity on ``directory/NAME.sock`` (mode 0600)."""

    def __init__(
        self,
        store: SvidStore,
        directory: str | os.PathLike[str],
        *,
        max_workers: int = 64,
        log: Logger | None = None,
    ) -> None:
        self._store = store
        self.directory = Path(directory)
        self._max_workers = max_workers
        self._log: Logger = log if log is not None else structlog.get_logger("devagent")
        self._servers: list[tuple[grpc.Server, ThreadPoolExecutor]] = []
        self._bound: list[Path] = []  # sockets we created (and so may remove)
        self.socket_paths: dict[str, Path] = {
            name: self.directory / f"{name}.sock" for name in store.identities
        }

    def start(self) -> None:
        """Bind every socket and start serving; raise (after cleaning up) on failure."""
        try:
            for name, path in self.socket_paths.items():
                if _socket_is_live(path):
                    raise SocketInUseError(f"{path} is in use by another process")
                path.unlink(missing_ok=True)
                pool = ThreadPoolExecutor(
                    max_workers=self._max_workers, thread_name_prefix=f"wlapi-{name}"
                )
                # Each open stream holds a worker thread; beyond the limit, calls fail
                # fast with RESOURCE_EXHAUSTED instead of queueing forever.
                server = grpc.server(pool, maximum_concurrent_rpcs=self._max_workers)
                self._servers.append((server, pool))
                servicer = WorkloadApiServicer(self._store, name, self._log)
                workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(  # type: ignore[no-untyped-call]
                    servicer, server
                )
                old_umask = os.umask(0o177)
                try:
                    server.add_insecure_port(f"unix:{path}")
                    self._bound.append(path)
                    server.start()
                finally:
                    os.umask(old_umask)
                os.chmod(path, 0o600)
                self._log.info(
                    "socket_listening",
                    identity=name,
                    socket=str(path),
                    spiffe_id=self._store.identities[name].spiffe_id,
                )
        except BaseException:
            self.stop(grace=0)
            raise

    def stop(self, grace: float = 1.0) -> None:
        """Release all streams, stop the servers, remove the sockets."""
        self._store.stop()
        events = [server.stop(grace) for server, _ in self._servers]
        for ev in events:
            ev.wait(grace + 2)
        for _, pool in self._servers:
            pool.shutdown(wait=False, cancel_futures=True)
        for path in self._bound:
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                self._log.warning("socket_remove_failed", socket=str(path), error=str(err))
        self._servers.clear()
        self._bound.clear()
