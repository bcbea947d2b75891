"""The controller's executor client against a stand-in executor on a unix socket: every
execution on one Session call, input files included, a new session after one is left mid-way
or refused, and the executor's statuses turned into the controller's errors."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.errors import ExecutorFailed, InvalidArgument, ResourceExhausted
from controller.runtime.executor_client import ExecutorClient
from petri.protocol import EXECUTOR_PROTOCOL
from petri.v1 import execution_pb2, executor_pb2, executor_pb2_grpc

KEY = "sandbox-key"


def _events(code: str) -> list[executor_pb2.ExecuteEvent]:
    return [
        executor_pb2.ExecuteEvent(stdout=f"ran {code}\n"),
        executor_pb2.ExecuteEvent(result=executor_pb2.ExecuteResult(execution_count=1)),
    ]


class StandIn(executor_pb2_grpc.ExecutorServicer):
    """Reads each execution as the executor does (request, file chunks, EndOfInputs; or a
    request that says its inputs end with it) and
    answers with two events. Code "hang" never gets to its result; code "refuse" is refused
    with the status its `refusal` says, as the executor refuses a bad input."""

    def __init__(self, refusal: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        self.refusal = refusal
        self.ends_of_inputs = 0
        self.metadata: list[dict[str, Any]] = []
        self.sessions = 0
        self.session_executions = 0
        self.interrupted = 0
        self.files: list[str] = []
        self.messages = 0

    # The files API is not this file's subject (test_service_files.py has it).
    async def ListFiles(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")

    async def ReadFile(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")
        yield  # a server-streaming method

    async def WriteFile(self, request_iterator: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")

    async def DeleteFile(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")

    async def Session(
        self, request_iterator: AsyncIterator[executor_pb2.ExecuteInput], context: Any
    ) -> AsyncIterator[executor_pb2.ExecuteEvents]:
        self.sessions += 1
        self.metadata.append(dict(context.invocation_metadata()))
        code = ""
        async for message in request_iterator:
            self.messages += 1
            if message.HasField("request"):
                code = message.request.code
                if not message.inputs_end_here:
                    continue
            elif message.HasField("file_chunk"):
                self.files.append(message.file_chunk.path)
                continue
            self.ends_of_inputs += 1
            self.session_executions += 1
            if code == "refuse":
                await context.abort(self.refusal, "x" * 5000)
            yield executor_pb2.ExecuteEvents(events=_events(code)[:1])
            if code == "hang":
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    self.interrupted += 1
                    raise
            yield executor_pb2.ExecuteEvents(events=_events(code)[1:])

    async def GetStatus(
        self, request: executor_pb2.GetStatusRequest, context: Any
    ) -> executor_pb2.ExecutorStatus:
        return executor_pb2.ExecutorStatus(incarnation="i", protocol=EXECUTOR_PROTOCOL)

    # Checkpoints are the fast tier's stand-in executor's (test_service_hibernation.py).
    async def Checkpoint(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this stand-in")

    async def Restore(self, request_iterator: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this stand-in")


async def _serve(tmp_path: Path, servicer: StandIn) -> tuple[grpc.aio.Server, ExecutorClient]:
    socket_path = tmp_path / "executor.sock"
    server = grpc.aio.server()
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    return server, ExecutorClient(socket_path, KEY, 1 << 20)


async def _run(
    client: ExecutorClient, code: str, files: list[str] | None = None
) -> list[str | None]:
    async def chunks() -> AsyncIterator[execution_pb2.FileChunk]:
        for path in files or []:
            yield execution_pb2.FileChunk(path=path, data=b"x", size=1, final=True)

    request = executor_pb2.ExecuteRequest(code=code)
    inputs = chunks() if files is not None else None
    return [event.WhichOneof("event") async for event in client.execute(request, inputs)]


async def test_executions_with_and_without_files_share_one_session(tmp_path: Path) -> None:
    servicer = StandIn()
    server, client = await _serve(tmp_path, servicer)
    try:
        for code, files in (("1+1", None), ("2+2", ["a.csv", "b.csv"]), ("3+3", [])):
            assert await _run(client, code, files) == ["stdout", "result"]
    finally:
        await client.close()
        await server.stop(None)
    assert (servicer.sessions, servicer.session_executions) == (1, 3)
    assert servicer.files == ["a.csv", "b.csv"] and servicer.ends_of_inputs == 3
    # Without files an execution is one message, its request saying its inputs end there.
    assert servicer.messages == 1 + (1 + 2 + 1) + 1
    (metadata,) = servicer.metadata
    assert metadata["petri-executor-key"] == KEY and "petri-sandbox-uid" not in metadata


async def test_an_execution_left_mid_way_ends_its_session(tmp_path: Path) -> None:
    servicer = StandIn()
    server, client = await _serve(tmp_path, servicer)
    try:
        events = client.execute(executor_pb2.ExecuteRequest(code="hang"))
        assert (await anext(events)).HasField("stdout")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 0.2)
        await events.aclose()
        for _ in range(100):  # the executor learns of it a moment later
            if servicer.interrupted:
                break
            await asyncio.sleep(0.01)
        assert servicer.interrupted == 1
        # The next execution does not read the hung one's leftovers: it has a session of its own.
        assert await _run(client, "1+1") == ["stdout", "result"]
    finally:
        await client.close()
        await server.stop(None)
    assert servicer.sessions == 2


async def test_inputs_that_fail_their_checks_never_reach_end_of_inputs(tmp_path: Path) -> None:
    """The controller refuses an input at a file boundary (a bad path): the executor must
    not take the call as complete, and `sent` (the code may have run) is never called."""
    servicer = StandIn()
    server, client = await _serve(tmp_path, servicer)
    sent: list[bool] = []

    async def chunks() -> AsyncIterator[execution_pb2.FileChunk]:
        yield execution_pb2.FileChunk(path="good.txt", data=b"g", final=True)
        raise ValueError("../x is not a relative path")

    try:
        with pytest.raises(ValueError):
            request = executor_pb2.ExecuteRequest(code="1+1")
            async for _ in client.execute(request, chunks(), lambda: sent.append(True)):
                pass
    finally:
        await client.close()
        await server.stop(None)
    assert servicer.ends_of_inputs == 0 and not sent


@pytest.mark.parametrize(
    ("refusal", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, ExecutorFailed),
    ],
)
async def test_the_executors_statuses_come_out_as_the_controllers_errors(
    tmp_path: Path, refusal: grpc.StatusCode, error: type[Exception]
) -> None:
    """Refused inputs are the caller's errors; anything else is an ExecutorFailed for the
    manager to judge. Either way the executor's words are bounded, and the next execution
    gets a session of its own."""
    servicer = StandIn(refusal)
    server, client = await _serve(tmp_path, servicer)
    try:
        with pytest.raises(error) as caught:
            await _run(client, "refuse", ["a.csv"])
        assert 1000 <= len(str(caught.value)) < 1100
        if isinstance(caught.value, ExecutorFailed):
            assert caught.value.code == "UNAVAILABLE" and not caught.value.refused
        assert await _run(client, "1+1") == ["stdout", "result"]
    finally:
        await client.close()
        await server.stop(None)
    assert servicer.sessions == 2


async def test_status_failures_are_executor_failures(tmp_path: Path) -> None:
    server, client = await _serve(tmp_path, StandIn())
    await server.stop(None)
    try:
        with pytest.raises(ExecutorFailed) as caught:
            await client.status(timeout=0.5)
        assert caught.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    finally:
        await client.close()


@pytest.mark.parametrize("files", [[], ["a.csv", "b.csv"]])
async def test_sent_comes_after_the_last_input_and_before_the_first_event(
    tmp_path: Path, files: list[str]
) -> None:
    """The controller starts its clock at `sent`: an upload is not the code's time."""
    happened: list[str] = []

    async def chunks() -> AsyncIterator[execution_pb2.FileChunk]:
        for path in files:
            happened.append(f"chunk {path}")
            yield execution_pb2.FileChunk(path=path, data=b"x", size=1, final=True)

    server, client = await _serve(tmp_path, StandIn())
    try:
        request = executor_pb2.ExecuteRequest(code="1+1")
        async for event in client.execute(request, chunks(), lambda: happened.append("sent")):
            happened.append(str(event.WhichOneof("event")))
    finally:
        await client.close()
        await server.stop(None)
    assert happened == [f"chunk {path}" for path in files] + ["sent", "stdout", "result"]


async def test_an_execution_ends_when_its_client_closes_as_it_starts(tmp_path: Path) -> None:
    """Closing the client (a deleted or terminated sandbox) just as an execution opens its
    call, before the call's metadata went out, ends the execution instead of leaving it
    waiting forever (grpc.aio's first write waits for that metadata)."""
    for attempt in range(20):
        socket_dir = tmp_path / str(attempt)
        socket_dir.mkdir()
        server, client = await _serve(socket_dir, StandIn())
        await client.wait_ready(5)
        await server.stop(None)  # its executor is gone: the channel reconnects

        async def execute(client: ExecutorClient = client) -> None:
            async for _ in client.execute(executor_pb2.ExecuteRequest(code="1+1")):
                pass

        task = asyncio.create_task(execute())
        await asyncio.sleep((attempt % 5) * 0.0002)
        await client.close()
        with pytest.raises(ExecutorFailed):
            await asyncio.wait_for(task, 5)
