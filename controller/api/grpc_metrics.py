"""The gRPC server's metrics, as go-grpc-prometheus names them: calls started, calls handled by
status code, handling time, messages received and sent (controller.metrics defines them).

Installed first, so that it sees every call the server answers, those the request guard
refuses included, and the code the caller gets: the handler's return (OK, or a code it set),
an abort's code, CANCELLED when the caller went away (DEADLINE_EXCEEDED when its deadline
passed), UNKNOWN for an exception (grpc.aio's answer to one). The guard makes every handler
read its request itself, so a call's type is the method's, from its service descriptor.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, cast

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from controller.api.interceptors import Behaviour, Context, Handler
from controller.metrics import GrpcMetrics

# The status code grpc.aio's context reports (an integer in some versions) → StatusCode.
_CODES: dict[object, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_CODES.update({code: code for code in grpc.StatusCode})


def _grpc_type(method: MethodDescriptor) -> str:
    if method.client_streaming:
        return "bidi_stream" if method.server_streaming else "client_stream"
    return "server_stream" if method.server_streaming else "unary"


class _Method:
    """One method's series, labelled once: recording a call costs a few additions."""

    def __init__(self, metrics: GrpcMetrics, service: str, method: MethodDescriptor) -> None:
        labels = (_grpc_type(method), service, method.name)
        self.labels = labels
        self.started = metrics.started.labels(*labels)
        self.handling = metrics.handling_seconds.labels(*labels)
        self.received = metrics.msg_received.labels(*labels)
        self.sent = metrics.msg_sent.labels(*labels)
        self._handled_family = metrics.handled
        # OK from the start, so that rate() over it works from the first scrape.
        self._handled = {grpc.StatusCode.OK: metrics.handled.labels(*labels, "OK")}

    def done(self, code: grpc.StatusCode, started: float) -> None:
        self.handling.observe(time.perf_counter() - started)
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = self._handled_family.labels(*self.labels, code.name)
        handled.inc()


def _final_code(context: Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code set on the context (by abort or set_code), else `default`."""
    code = context.code()
    return default if code is None else _CODES.get(code, grpc.StatusCode.UNKNOWN)


def _cancelled(context: Context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class ServerMetrics(grpc.aio.ServerInterceptor):
    """Counts and times every call to the methods of `services`."""

    def __init__(self, metrics: GrpcMetrics, services: Iterable[ServiceDescriptor]) -> None:
        self._methods = {
            f"/{service.full_name}/{method.name}": _Method(metrics, service.full_name, method)
            for service in services
            for method in service.methods
        }

    def counter_of_requests(self, method: str) -> Callable[[], None] | None:
        """What counts a request message of `method` (the request guard reads them)."""
        measured = self._methods.get(method)
        return None if measured is None else measured.received.inc

    def __repr__(self) -> str:
        return f"<ServerMetrics methods={len(self._methods)}>"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = self._methods.get(handler_call_details.method)
        if handler is None or method is None:  # unknown: gRPC answers UNIMPLEMENTED
            return handler
        return _measured(handler, method)


def _behaviour_of(handler: Handler) -> Behaviour:
    behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behaviour is not None, "a method handler has one behaviour"
    return cast(Behaviour, behaviour)


class _CountedWrites:
    """The call's context, its context.write counted as a message sent (a handler that
    writes so, as ReadFile, yields nothing for the wrapper to count)."""

    def __init__(self, context: Context, sent: Any) -> None:
        self._context = context
        self._sent = sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._sent.inc()


def _measured(handler: Handler, method: _Method) -> Handler:
    inner = _behaviour_of(handler)
    serializer = handler.response_serializer
    deserializer = handler.request_deserializer

    if handler.response_streaming:

        async def stream_out(request: Any, context: Context) -> AsyncIterator[Any]:
            method.started.inc()
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                responses = inner(request, cast(Context, _CountedWrites(context, method.sent)))
                if inspect.isawaitable(responses):  # it writes with context.write
                    await responses
                else:
                    async for response in responses:
                        method.sent.inc()
                        yield response
                        del response  # an abort's traceback outlives the call, with this frame
                code = _final_code(context, grpc.StatusCode.OK)
            except (asyncio.CancelledError, GeneratorExit):  # closed at a yield: the same
                code = _cancelled(context)
                raise
            except grpc.aio.AbortError:
                code = _final_code(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                method.done(code, started)

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(stream_out, deserializer, serializer)
        return grpc.unary_stream_rpc_method_handler(stream_out, deserializer, serializer)

    async def unary_out(request: Any, context: Context) -> Any:
        method.started.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await inner(request, context)
            code = _final_code(context, grpc.StatusCode.OK)
            if code is grpc.StatusCode.OK:
                method.sent.inc()
            return response
        except asyncio.CancelledError:
            code = _cancelled(context)
            raise
        except grpc.aio.AbortError:
            code = _final_code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            method.done(code, started)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_out, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(unary_out, deserializer, serializer)
