"""Wrapping gRPC method handlers without losing what grpcio reads off them.

grpcio serves a handler without pinning a worker thread when the behaviour
function carries ``experimental_non_blocking`` (the health servicer's Watch
does); it then passes the send-response callback as a third positional argument.
A wrapper that drops the attribute, or the argument, turns every open Watch
stream into a held thread —
a handful of callers could then starve the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import experimental as _experimental

if TYPE_CHECKING:
    # Interceptors see every RPC: requests and responses of any message type.
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Handler | None]
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor

_GRPC_ATTRIBUTES = ("experimental_non_blocking", "experimental_thread_pool")

_wrap_server_method_handler: Callable[[Callable[..., Any], Handler], Handler] = (
    _experimental.wrap_server_method_handler
)


def keep_grpc_attributes(wrapper: Callable[..., Any],
                         behavior: Callable[..., Any]) -> Callable[..., Any]:
    for name in _GRPC_ATTRIBUTES:
        if hasattr(behavior, name):
            setattr(wrapper, name, getattr(behavior, name))
    return wrapper


def wrap_handler(wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
                 handler: Handler) -> Handler:
    """``grpc.experimental.wrap_server_method_handler`` that keeps grpcio's attributes."""

    def preserving(behavior: Callable[..., Any]) -> Callable[..., Any]:
        return keep_grpc_attributes(wrap(behavior), behavior)

    return _wrap_server_method_handler(preserving, handler)


class WrappingInterceptor(_Interceptor):
    """A server interceptor that wraps each method's handler once (``_wrap``) and serves the
    wrapped one from then on: the registered handler of a method never changes."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def intercept_service(self, continuation: Continuation,
                          details: grpc.HandlerCallDetails) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None  # gRPC answers UNIMPLEMENTED; nothing of ours runs
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        raise NotImplementedError
