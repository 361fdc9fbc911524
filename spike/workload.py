"""A small SPIFFE Workload API client: X.509-SVIDs from the agent's unix socket.

SPIKE needs one call of the Workload API, ``FetchX509SVID`` (a server stream: the current SVID
and then each new one). py-spiffe's client would cost every start of Pilot and Nexus about
80 ms of imports (its package loads JWT, ASN.1 and HTTP modules SPIKE never uses), so the call
is made here with grpcio directly and its two messages are read from the protobuf wire format:

    X509SVIDResponse { repeated X509SVID svids = 1; ... }
    X509SVID { string spiffe_id = 1; bytes x509_svid = 2; bytes x509_svid_key = 3;
               bytes bundle = 4; ... }

``x509_svid`` and ``bundle`` are ASN.1 DER certificates, concatenated; ``x509_svid_key`` is a
PKCS#8 DER key. The first SVID is the default one (as py-spiffe picks it). Nothing is checked
here beyond the framing: spike/identity.py applies the X509-SVID rules to what comes back.

:class:`X509Watch` follows the stream the way py-spiffe's ``X509Source`` does: it reconnects
with exponential backoff (0.1 s doubling to 5 s, reset by each good answer) when the stream ends
or fails, except on CANCELLED and INVALID_ARGUMENT, and on an answer it cannot read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

METHOD = "/SpiffeWorkloadAPI/FetchX509SVID"
HEADER = ("workload.spiffe.io", "true")
_FATAL = (grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT)
_FIRST_BACKOFF, _MAX_BACKOFF = 0.1, 5.0


class WorkloadApiError(Exception):
    """The Workload API did not give a readable X.509-SVID (the message says why)."""


@dataclass(frozen=True)
class X509Svid:
    """The default X.509-SVID of an answer, as DER."""

    spiffe_id: str
    chain_der: tuple[bytes, ...]
    key_der: bytes
    bundle_der: tuple[bytes, ...]

    def __repr__(self) -> str:  # never show the private key
        return f"X509Svid(spiffe_id={self.spiffe_id!r})"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WorkloadApiError("malformed Workload API answer (varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """The length-delimited fields of one message as (number, bytes); other kinds skipped."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            _, pos = _varint(buf, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise WorkloadApiError("malformed Workload API answer (truncated field)")
            yield number, buf[pos:pos + size]
            pos += size
        else:
            raise WorkloadApiError(f"malformed Workload API answer (wire type {kind})")
        if pos > len(buf):
            raise WorkloadApiError("malformed Workload API answer (truncated)")


def der_certificates(der: bytes) -> tuple[bytes, ...]:
    """Split concatenated DER certificates (each an ASN.1 SEQUENCE) apart."""
    out = []
    pos = 0
    while pos < len(der):
        if der[pos] != 0x30 or pos + 2 > len(der):
            raise WorkloadApiError("malformed certificate list in the Workload API answer")
        first = der[pos + 1]
        header = 2
        size = first
        if first & 0x80:
            count = first & 0x7F
            if not 1 <= count <= 4 or pos + 2 + count > len(der):
                raise WorkloadApiError("malformed certificate list in the Workload API answer")
            size = int.from_bytes(der[pos + 2:pos + 2 + count], "big")
            header += count
        end = pos + header + size
        if end > len(der):
            raise WorkloadApiError("truncated certificate in the Workload API answer")
        out.append(der[pos:end])
        pos = end
    return tuple(out)


def parse_x509_response(raw: bytes) -> X509Svid:
    """The default (first) SVID of an ``X509SVIDResponse``."""
    for number, svid in _fields(raw):
        if number != 1:
            continue
        values: dict[int, bytes] = {}
        for field, value in _fields(svid):
            values.setdefault(field, value)
        try:
            spiffe_id = values.get(1, b"").decode()
        except UnicodeDecodeError:
            raise WorkloadApiError("malformed SPIFFE ID in the Workload API answer") from None
        return X509Svid(spiffe_id, der_certificates(values.get(2, b"")), values.get(3, b""),
                        der_certificates(values.get(4, b"")))
    raise WorkloadApiError("the Workload API returned no X.509-SVID for this workload")


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else ""
    name = code.name if code is not None else "error"
    return f"{name}: {details}" if details else name


def _open(channel: grpc.Channel, timeout: float | None) -> Any:
    """The server stream of FetchX509SVID: a grpc call, iterable and cancellable."""
    call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
    return call(b"", metadata=(HEADER,), timeout=timeout)


def fetch_x509(address: str, timeout: float) -> X509Svid:
    """The current SVID, once (``address``: ``unix:///path``)."""
    with grpc.insecure_channel(address) as channel:
        stream = _open(channel, timeout)
        try:
            raw = next(stream)
        except StopIteration:
            raise WorkloadApiError("the Workload API ended the stream without an answer") from None
        except grpc.RpcError as exc:
            raise WorkloadApiError(_describe(exc)) from None
        finally:
            stream.cancel()
    return parse_x509_response(raw)


class X509Watch:
    """Follows ``FetchX509SVID`` in a daemon thread; :meth:`first` waits for the first SVID,
    ``on_update`` (when set) gets each later one."""

    def __init__(self, address: str) -> None:
        self.on_update: Callable[[X509Svid], None] | None = None
        self._channel = grpc.insecure_channel(address)
        self._closed = threading.Event()
        self._answered = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._latest: X509Svid | None = None
        self._error = ""
        threading.Thread(target=self._follow, name="workload-api", daemon=True).start()

    def first(self, timeout: float) -> X509Svid:
        """The first SVID; WorkloadApiError (and the watch closed) when none came in
        ``timeout`` seconds or the API failed for good."""
        self._answered.wait(timeout)
        latest, error = self._latest, self._error
        if latest is None:
            self.close()
            reason = error or "no answer"
            if not self._answered.is_set():
                reason += f" (waited {timeout:g} s)"
            raise WorkloadApiError(reason)
        return latest

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        self._channel.close()

    def _deliver(self, svid: X509Svid) -> None:
        first = self._latest is None
        self._latest = svid
        self._answered.set()
        callback = self.on_update
        if not first and callback is not None:
            callback(svid)

    def _follow(self) -> None:
        backoff = _FIRST_BACKOFF
        while not self._closed.is_set():
            try:
                with self._lock:
                    if self._closed.is_set():
                        return
                    self._stream = stream = _open(self._channel, None)
                for raw in stream:
                    self._deliver(parse_x509_response(raw))
                    backoff = _FIRST_BACKOFF
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                self._error = _describe(exc)
                if isinstance(exc, grpc.Call) and exc.code() in _FATAL:
                    self._answered.set()
                    return
            except (WorkloadApiError, ValueError) as exc:
                self._error = str(exc)
                self._answered.set()
                return
            if self._closed.wait(backoff):
                return
            backoff = min(backoff * 2, _MAX_BACKOFF)
