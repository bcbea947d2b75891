"""The controller's executor client against a stand-in executor on a unix socket: executions on
one Session call, a new session after one is left mid-way, and Execute for input files and for
executors whose status says they predate Session."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.runtime.executor_client import ExecutorClient
from petri.v1 import execution_pb2, executor_pb2, executor_pb2_grpc

UID = "sandbox-uid"
KEY = "sandbox-key"


def _events(code: str) -> list[executor_pb2.ExecuteEvent]:
    return [
        executor_pb2.ExecuteEvent(stdout=f"ran {code}\n"),
        executor_pb2.ExecuteEvent(result=executor_pb2.ExecuteResult(execution_count=1)),
    ]


class StandIn(executor_pb2_grpc.ExecutorServicer):
    """Answers with two events; without Session when `has_session` is false, like an older
    image (which says so in its status, and answers UNIMPLEMENTED). Code "hang" never gets to
    its result."""

    def __init__(self, has_session: bool, has_end_of_inputs: bool = True) -> None:
        self.has_session = has_session
        self.has_end_of_inputs = has_end_of_inputs
        self.ends_of_inputs = 0
        self.metadata: list[dict[str, Any]] = []
        self.sessions = 0
        self.session_executions = 0
        self.interrupted = 0
        self.execute_calls = 0
        self.files: list[str] = []

    async def Execute(
        self, request_iterator: AsyncIterator[executor_pb2.ExecuteInput], context: Any
    ) -> AsyncIterator[executor_pb2.ExecuteEvent]:
        self.execute_calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        code = ""
        async for message in request_iterator:
            if message.HasField("request"):
                code = message.request.code
            elif message.HasField("end_of_inputs"):
                self.ends_of_inputs += 1
            else:
                self.files.append(message.file_chunk.path)
        for event in _events(code):
            yield event

    async def Session(
        self, request_iterator: AsyncIterator[executor_pb2.ExecuteRequest], context: Any
    ) -> AsyncIterator[executor_pb2.ExecuteEvents]:
        self.sessions += 1
        if not self.has_session:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        async for request in request_iterator:
            self.session_executions += 1
            yield executor_pb2.ExecuteEvents(events=_events(request.code)[:1])
            if request.code == "hang":
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    self.interrupted += 1
                    raise
            yield executor_pb2.ExecuteEvents(events=_events(request.code)[1:])

    async def GetStatus(
        self, request: executor_pb2.GetStatusRequest, context: Any
    ) -> executor_pb2.ExecutorStatus:
        return executor_pb2.ExecutorStatus(
            sessions=self.has_session, end_of_inputs=self.has_end_of_inputs
        )


async def _serve(tmp_path: Path, servicer: StandIn) -> tuple[grpc.aio.Server, ExecutorClient]:
    socket_path = tmp_path / "executor.sock"
    server = grpc.aio.server()
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    return server, ExecutorClient(socket_path, UID, KEY, 1 << 20)


async def _run(
    client: ExecutorClient, code: str, files: list[str] | None = None
) -> list[str | None]:
    async def chunks() -> AsyncIterator[execution_pb2.FileChunk]:
        for path in files or []:
            yield execution_pb2.FileChunk(path=path, data=b"x", size=1, final=True)

    request = executor_pb2.ExecuteRequest(code=code)
    inputs = chunks() if files is not None else None
    return [event.WhichOneof("event") async for event in client.execute(request, inputs)]


@pytest.mark.parametrize("has_session", [True, False])
async def test_executions_yield_their_events_from_either_call(
    tmp_path: Path, has_session: bool
) -> None:
    servicer = StandIn(has_session)
    server, client = await _serve(tmp_path, servicer)
    try:
        for code in ("1+1", "2+2", "3+3"):
            assert await _run(client, code) == ["stdout", "result"]
    finally:
        await client.close()
        await server.stop(None)
    if has_session:  # one session carries them all
        assert (servicer.sessions, servicer.session_executions, servicer.execute_calls) == (1, 3, 0)
    else:  # an executor that says it has no Session gets a call per execution
        assert (servicer.sessions, servicer.execute_calls) == (0, 3)


async def test_an_execution_left_mid_way_ends_its_session(tmp_path: Path) -> None:
    servicer = StandIn(has_session=True)
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


async def test_input_files_go_through_execute(tmp_path: Path) -> None:
    servicer = StandIn(has_session=True)
    server, client = await _serve(tmp_path, servicer)
    try:
        assert await _run(client, "open('a.csv').read()", ["a.csv", "b.csv"]) == [
            "stdout",
            "result",
        ]
    finally:
        await client.close()
        await server.stop(None)
    assert servicer.files == ["a.csv", "b.csv"] and servicer.sessions == 0
    assert servicer.ends_of_inputs == 1
    metadata = servicer.metadata[0]
    assert (metadata["petri-executor-key"], metadata["petri-sandbox-uid"]) == (KEY, UID)


async def test_inputs_that_fail_their_checks_never_reach_end_of_inputs(tmp_path: Path) -> None:
    """The controller refuses an input at a file boundary (a bad path): the executor must
    not take the call as complete, and `sent` (the code may have run) is never called."""
    servicer = StandIn(has_session=True)
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


async def test_an_executor_of_an_older_image_gets_no_end_of_inputs(tmp_path: Path) -> None:
    """Its status says it runs at half-close (and would refuse the message it does not know)."""
    servicer = StandIn(has_session=True, has_end_of_inputs=False)
    server, client = await _serve(tmp_path, servicer)
    try:
        assert await _run(client, "1+1", ["a.csv"]) == ["stdout", "result"]
    finally:
        await client.close()
        await server.stop(None)
    assert servicer.files == ["a.csv"] and servicer.ends_of_inputs == 0


async def test_a_stream_without_files_goes_through_the_session(tmp_path: Path) -> None:
    servicer = StandIn(has_session=True)
    server, client = await _serve(tmp_path, servicer)
    try:
        assert await _run(client, "1+1", files=[]) == ["stdout", "result"]
    finally:
        await client.close()
        await server.stop(None)
    assert (servicer.sessions, servicer.execute_calls) == (1, 0)


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

    server, client = await _serve(tmp_path, StandIn(has_session=True))
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
        server, client = await _serve(socket_dir, StandIn(has_session=True))
        await client.wait_ready(5)
        await server.stop(None)  # its executor is gone: the channel reconnects

        async def execute(client: ExecutorClient = client) -> None:
            async for _ in client.execute(executor_pb2.ExecuteRequest(code="1+1")):
                pass

        task = asyncio.create_task(execute())
        await asyncio.sleep((attempt % 5) * 0.0002)
        await client.close()
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(task, 5)
