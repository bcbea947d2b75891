"""--otel-tracing: a server span per gRPC call, exported over OTLP/gRPC to the collector the
standard OTEL_* variables name (here a stand-in collector on loopback), through the metrics
interceptor and the request guard, for unary and streaming methods."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from controller.app import _tracing
from petri.v1 import execution_pb2, sandbox_pb2
from tests.unit.controller.inprocess import eventually, expect, fast_config, fast_petri
from tests.unit.controller.standin_executor import Hang

SERVICE = "petri.v1.SandboxService"
# rpc.grpc.status_code's values.
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, NOT_FOUND, INTERNAL, UNAUTHENTICATED = (
    0,
    1,
    2,
    4,
    5,
    13,
    16,
)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps the spans exported to it, with their resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            self.resources.append(_attributes(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, method: str) -> list[Span]:
        return [span for span in self.spans if span.name == f"/{SERVICE}/{method}"]


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@contextlib.asynccontextmanager
async def collecting() -> AsyncIterator[tuple[Collector, int]]:
    collector = Collector()
    server = grpc.aio.server()
    serve: Callable[[Collector, grpc.aio.Server], None] = (
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server  # untyped upstream
    )
    serve(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield collector, port
    finally:
        await server.stop(None)


@contextlib.contextmanager
def exporting_to(port: int) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        patch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms: export soon after a span ends
        patch.setenv("OTEL_SERVICE_NAME", "petri-test")
        yield


async def spans_of(collector: Collector, method: str, count: int) -> list[Span]:
    async def check() -> list[Span] | None:
        spans = collector.named(method)
        return spans if len(spans) >= count else None

    return await eventually(check, f"{count} span(s) of {method} at the collector")


def check_server_span(span: Span, method: str, code: int) -> dict[str, Any]:
    attributes = _attributes(span.attributes)
    assert span.kind == Span.SPAN_KIND_SERVER, span
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == SERVICE
    assert attributes["rpc.method"] == method
    assert attributes["rpc.grpc.status_code"] == code, attributes
    assert attributes["net.peer.ip"] == "127.0.0.1"
    assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
    return attributes


async def test_calls_become_server_spans_at_the_otlp_collector(tmp_path: Path) -> None:
    async with collecting() as (collector, port):
        with exporting_to(port):
            # With metrics on too: the metrics interceptor, the tracing one, the request guard.
            options = {"otel_tracing": True, "metrics_listen": "127.0.0.1:0"}
            async with fast_petri(tmp_path, **options) as petri:
                # Refused by the servicer (the domain's NotFound), through the request guard.
                await expect(
                    petri.get("projects/fast/sandboxes/nothing"), grpc.StatusCode.NOT_FOUND
                )
                # A caller's trace context (W3C traceparent) is continued.
                await petri.stub.ListSandboxes(
                    sandbox_pb2.ListSandboxesRequest(parent="projects/fast"),
                    metadata=(("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),),
                )
                sandbox = await petri.create()
                result = await petri.execute(sandbox.name, "1+1")
                assert not result.HasField("error"), result

                # The servicer's answer to an unexpected error: INTERNAL, an error span.
                def broken(*args: Any) -> Any:
                    raise RuntimeError("a bug")

                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(petri.controller.manager, "get", broken)
                    await expect(petri.get(sandbox.name), grpc.StatusCode.INTERNAL)

                async def stream() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
                    start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code="streamed")
                    yield sandbox_pb2.StreamExecuteCodeRequest(start=start)
                    chunk = execution_pb2.FileChunk(path="b.bin", data=b"ab", final=True)
                    yield sandbox_pb2.StreamExecuteCodeRequest(input_chunk=chunk)

                events = [e async for e in petri.stub.StreamExecuteCode(stream())]
                assert events and events[-1].HasField("result"), events

                # All calls are exported while the controller runs, not only at its stop.
                got, internal = await spans_of(collector, "GetSandbox", 2)
                (create,) = await spans_of(collector, "CreateSandbox", 1)
                (execute,) = await spans_of(collector, "ExecuteCode", 1)
                (streamed,) = await spans_of(collector, "StreamExecuteCode", 1)
                (listed,) = await spans_of(collector, "ListSandboxes", 1)

    # Semantic conventions: a server span's status is an error only for the server's faults
    # (INTERNAL, UNKNOWN, UNAVAILABLE...); a caller's (NOT_FOUND) is the status code attribute.
    check_server_span(got, "GetSandbox", NOT_FOUND)
    assert got.status.code == Status.STATUS_CODE_UNSET, got.status
    check_server_span(internal, "GetSandbox", INTERNAL)
    assert internal.status.code == Status.STATUS_CODE_ERROR, internal.status
    # Its description is what the caller got, which names no bug...
    assert internal.status.message.startswith("StatusCode.INTERNAL:internal error (reference ")
    assert "a bug" not in internal.status.message
    # ...but an aborted call's span has the abort's traceback, which chains the error's, as
    # the controller's log does: the collector is as private as the log (docs/metrics.md).
    assert {event.name for event in internal.events} == {"exception"}
    traces = [_attributes(event.attributes)["exception.stacktrace"] for event in internal.events]
    assert all("RuntimeError: a bug" in trace for trace in traces), traces
    for span, method in ((create, "CreateSandbox"), (execute, "ExecuteCode")):
        check_server_span(span, method, OK)
        assert span.status.code == Status.STATUS_CODE_UNSET, span.status
    check_server_span(streamed, "StreamExecuteCode", OK)
    check_server_span(listed, "ListSandboxes", OK)
    assert (listed.trace_id.hex(), listed.parent_span_id.hex()) == (CALLER_TRACE, CALLER_SPAN)
    assert not got.parent_span_id
    # The calls are separate traces (no caller's context was sent), from this service.
    assert len({span.trace_id for span in (got, create, execute, streamed)}) == 4
    assert {resource["service.name"] for resource in collector.resources} == {"petri-test"}
    # Only the calls to the API: not the exporter's own calls, nor podman's or the executor's.
    assert {span.name.rpartition("/")[0] for span in collector.spans} == {f"/{SERVICE}"}


async def test_a_second_controller_in_the_process_traces_too(tmp_path: Path) -> None:
    """The tracer provider is the controller's, not the process's (which is set only once):
    a controller started after another stopped traces its calls, and its stop flushes them."""
    async with collecting() as (collector, port):
        with exporting_to(port), pytest.MonkeyPatch.context() as patch:
            # Long enough that only the stop's flush can have exported the span in time.
            patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
            for run in ("first", "second"):
                async with fast_petri(tmp_path / run, otel_tracing=True) as petri:
                    await expect(
                        petri.get(f"projects/fast/sandboxes/{run}"), grpc.StatusCode.NOT_FOUND
                    )
                # Stopped: its span was flushed on the way out.
                spans = collector.named("GetSandbox")
                assert len(spans) == (1 if run == "first" else 2), spans


async def test_calls_that_end_without_an_abort_have_their_code(tmp_path: Path) -> None:
    """OpenTelemetry's interceptor sees a code only in an abort: a call whose caller went away
    or whose deadline passed would be OK in its span without _SpanEndings."""
    async with collecting() as (collector, port):
        with exporting_to(port):
            async with fast_petri(tmp_path, otel_tracing=True) as petri:
                sandbox = await petri.create()
                gone, late, streamed = Hang(), Hang(), Hang()
                petri.runtime.scripts.update(gone=gone, late=late, streamed=streamed)

                call = petri.stub.ExecuteCode(
                    sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="gone")
                )
                await gone.began.wait()
                call.cancel()
                (cancelled,) = await spans_of(collector, "ExecuteCode", 1)

                request = sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="late")
                await expect(
                    petri.stub.ExecuteCode(request, timeout=0.5), grpc.StatusCode.DEADLINE_EXCEEDED
                )
                _, overdue = await spans_of(collector, "ExecuteCode", 2)

                async def stream() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
                    start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code="streamed")
                    yield sandbox_pb2.StreamExecuteCodeRequest(start=start)

                stream_call = petri.stub.StreamExecuteCode(stream())
                first = await stream_call.read()
                assert isinstance(first, sandbox_pb2.StreamExecuteCodeResponse), first
                stream_call.cancel()
                (cancelled_stream,) = await spans_of(collector, "StreamExecuteCode", 1)

    check_server_span(cancelled, "ExecuteCode", CANCELLED)
    assert cancelled.status.code == Status.STATUS_CODE_UNSET, cancelled.status
    check_server_span(overdue, "ExecuteCode", DEADLINE_EXCEEDED)
    assert overdue.status.code == Status.STATUS_CODE_ERROR, overdue.status
    check_server_span(cancelled_stream, "StreamExecuteCode", CANCELLED)


async def test_an_exception_past_the_servicer_is_unknown_in_its_span(tmp_path: Path) -> None:
    """grpc.aio answers an exception a handler raises UNKNOWN (the servicer's own are INTERNAL
    aborts): so does the span."""

    class Broken(health.aio.HealthServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> NoReturn:
            raise RuntimeError("a bug")

    async with collecting() as (collector, port):
        with exporting_to(port):
            tracing = _tracing(fast_config(tmp_path, tmp_path, otel_tracing=True))
        assert tracing.stop is not None
        server = grpc.aio.server(interceptors=tracing.interceptors)
        health_pb2_grpc.add_HealthServicer_to_server(Broken(), server)
        server_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                await expect(stub.Check(health_pb2.HealthCheckRequest()), grpc.StatusCode.UNKNOWN)
        finally:
            await server.stop(None)
            await asyncio.to_thread(tracing.stop)
        (span,) = [span for span in collector.spans if span.name == "/grpc.health.v1.Health/Check"]
    assert _attributes(span.attributes)["rpc.grpc.status_code"] == UNKNOWN
    assert span.status.code == Status.STATUS_CODE_ERROR, span.status


async def test_a_call_the_request_guard_refuses_unread_is_a_span(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    digest = hashlib.sha256(b"secret").hexdigest()
    tokens.write_text(f'[[tokens]]\nname = "a"\nsha256 = "{digest}"\nprojects = ["fast"]\n')
    async with collecting() as (collector, port):
        with exporting_to(port):
            async with fast_petri(tmp_path, otel_tracing=True, tokens_file=tokens) as petri:
                await expect(
                    petri.get("projects/fast/sandboxes/x"), grpc.StatusCode.UNAUTHENTICATED
                )
                (refused,) = await spans_of(collector, "GetSandbox", 1)
    check_server_span(refused, "GetSandbox", UNAUTHENTICATED)
    assert refused.status.code == Status.STATUS_CODE_UNSET, refused.status
