"""Times every RPC and reports (method, status code, seconds) to a callback.

It does not know about Prometheus: ``nexus.metrics`` supplies the callback and
bounds the label values. Put it first in the server's interceptor list so that
calls the authorization interceptor rejects are timed too. Streaming responses
are observed when the stream ends (completed, failed or cancelled).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from nexus.api.handlers import WrappingInterceptor, wrap_handler

if TYPE_CHECKING:
    from nexus.api.handlers import Handler

Observe = Callable[[str, str, float], None]


def status_name(context: grpc.ServicerContext, failed: bool) -> str:
    """The call's status code name; a raise without a code set is UNKNOWN."""
    code_of = getattr(context, "code", None)
    code = code_of() if callable(code_of) else None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN" if failed else "OK"


class RpcMetricsInterceptor(WrappingInterceptor):
    def __init__(self, observe: Observe) -> None:
        super().__init__()
        self._observe = observe

    def _wrap(self, method: str, handler: Handler) -> Handler:
        observe = self._observe
        streaming = bool(handler.response_streaming)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def timed(request: Any, context: grpc.ServicerContext, *more: Any) -> Any:
                start = time.perf_counter()
                try:
                    result = behavior(request, context, *more)
                except BaseException:
                    observe(method, status_name(context, True), time.perf_counter() - start)
                    raise
                if streaming and result is not None:  # None: a non-blocking stream
                    return _timed_stream(result, method, context, start, observe)
                observe(method, status_name(context, False), time.perf_counter() - start)
                return result

            return timed

        return wrap_handler(wrap, handler)


def _timed_stream(
    responses: Iterator[Any],
    method: str,
    context: grpc.ServicerContext,
    start: float,
    observe: Observe,
) -> Iterator[Any]:
    code = ""
    try:
        yield from responses
    except GeneratorExit:
        code = "CANCELLED"
        raise
    except BaseException:
        code = status_name(context, True)
        raise
    finally:
        observe(method, code or status_name(context, False), time.perf_counter() - start)
