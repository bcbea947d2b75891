"""The executor's gRPC service with a real supervisor and worker (no container): only the
controller's key opens it, one Session call carries executions with and without files, an
upload counts only once EndOfInputs says it is complete, an input problem ends the call with
nothing written, and no execution goes without a timeout."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from executor.daemon import KEY_METADATA, CallerCheck, ExecutorService, _take_key
from executor.supervisor import Supervisor
from petri.protocol import EXECUTOR_PROTOCOL
from petri.v1 import execution_pb2, executor_pb2, executor_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.executor_pb2_grpc import ExecutorAsyncStub as Stub

KEY = "the-controllers-secret"
CODE = "open('ran', 'w').write('x')"


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[Stub]:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    supervisor = Supervisor(workspace)
    await supervisor.start()
    server = grpc.aio.server(interceptors=[CallerCheck(KEY)])
    executor_pb2_grpc.add_ExecutorServicer_to_server(ExecutorService(supervisor), server)
    server.add_insecure_port(f"unix:{tmp_path / 'executor.sock'}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'executor.sock'}") as channel:
        yield executor_pb2_grpc.ExecutorStub(channel)
    await server.stop(None)
    await supervisor.close()


def _request(code: str = CODE, timeout: int = 10) -> executor_pb2.ExecuteRequest:
    return executor_pb2.ExecuteRequest(
        code=code, timeout=Duration(seconds=timeout), max_input_bytes=1 << 20
    )


def _chunk(path: str) -> executor_pb2.ExecuteInput:
    return executor_pb2.ExecuteInput(
        file_chunk=execution_pb2.FileChunk(path=path, data=b"g", final=True)
    )


END = executor_pb2.ExecuteInput(end_of_inputs=executor_pb2.EndOfInputs())
KEYED = ((KEY_METADATA, KEY),)


async def _events(call: Any) -> list[executor_pb2.ExecuteEvent]:
    """One execution's events, read off a session up to its result."""
    events: list[executor_pb2.ExecuteEvent] = []
    while not (events and events[-1].HasField("result")):
        batch = await call.read()
        assert isinstance(batch, executor_pb2.ExecuteEvents), batch
        events.extend(batch.events)
    return events


async def test_calls_without_the_key_are_refused(stub: Stub) -> None:
    for metadata in ((), ((KEY_METADATA, "guess"),), (("petri-sandbox-uid", "x"),)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        call = stub.Session(metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            # The refusal may come before the write goes out: then the write raises it.
            await call.write(executor_pb2.ExecuteInput(request=_request()))
            await call.read()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = await stub.GetStatus(executor_pb2.GetStatusRequest(), metadata=KEYED)
    assert status.incarnation and status.python_version
    assert status.protocol == EXECUTOR_PROTOCOL  # the controller talks to no other version


async def test_inputs_ended_without_end_of_inputs_write_and_run_nothing(
    stub: Stub, tmp_path: Path
) -> None:
    """grpc.aio can show a cancelled call to the executor as a half-closed one: a half-close
    alone must not commit the files sent so far, nor run the code."""
    call = stub.Session(metadata=KEYED)
    await call.write(executor_pb2.ExecuteInput(request=_request()))
    await call.write(_chunk("good.txt"))
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert "nothing ran" in str(caught.value.details())
    assert os.listdir(tmp_path / "workspace") == []


async def test_end_of_inputs_commits_and_runs(stub: Stub, tmp_path: Path) -> None:
    call = stub.Session(metadata=KEYED)
    await call.write(executor_pb2.ExecuteInput(request=_request()))
    await call.write(_chunk("good.txt"))
    await call.write(END)
    await call.done_writing()
    events = [event async for batch in call for event in batch.events]
    assert events[-1].HasField("result") and not events[-1].result.HasField("error")
    assert sorted(os.listdir(tmp_path / "workspace")) == ["good.txt", "ran"]


async def test_one_session_carries_executions_with_and_without_files(
    stub: Stub, tmp_path: Path
) -> None:
    call = stub.Session(metadata=KEYED)
    for code, files in (("x = 1", []), ("x += len(open('in.txt').read())", ["in.txt"]), ("x", [])):
        await call.write(executor_pb2.ExecuteInput(request=_request(code)))
        for path in files:
            await call.write(_chunk(path))
        await call.write(END)
        events = await _events(call)
    shown = [e.output.text["text/plain"] for e in events if e.HasField("output")]
    assert shown == ["2"] and events[-1].result.execution_count == 3
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    assert sorted(os.listdir(tmp_path / "workspace")) == ["in.txt"]


async def test_a_request_that_ends_its_inputs_runs_at_once_and_takes_no_chunk(
    stub: Stub, tmp_path: Path
) -> None:
    """An execution without files may be one message: its request says its inputs end there.
    A chunk after it is no part of it: it would start the next execution, which must begin
    with a request."""
    call = stub.Session(metadata=KEYED)
    await call.write(executor_pb2.ExecuteInput(request=_request(), inputs_end_here=True))
    async with asyncio.timeout(10):  # an executor waiting for EndOfInputs never answers
        assert (await _events(call))[-1].result.execution_count == 1
    await call.write(_chunk("late.txt"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _events(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must begin with its request" in str(caught.value.details())
    assert sorted(os.listdir(tmp_path / "workspace")) == ["ran"]


@pytest.mark.parametrize(
    ("inputs", "code", "says"),
    [
        ([_chunk("../escape")], grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        ([_chunk("a.txt"), _chunk("a.txt")], grpc.StatusCode.INVALID_ARGUMENT, "twice"),
        ([executor_pb2.ExecuteInput(request=_request())], grpc.StatusCode.INVALID_ARGUMENT, "only"),
        (
            [
                executor_pb2.ExecuteInput(
                    file_chunk=execution_pb2.FileChunk(path="big", data=b"x" * 2048)
                )
            ],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "exceed",
        ),
    ],
)
async def test_an_input_problem_ends_the_session_and_nothing_is_written(
    stub: Stub,
    tmp_path: Path,
    inputs: list[executor_pb2.ExecuteInput],
    code: grpc.StatusCode,
    says: str,
) -> None:
    call = stub.Session(metadata=KEYED)
    await call.write(executor_pb2.ExecuteInput(request=_request()))
    await call.write(END)
    await _events(call)  # an execution before it leaves its file
    request = _request("open('late', 'w').write('x')")
    request.max_input_bytes = 1024
    await call.write(executor_pb2.ExecuteInput(request=request))
    for message in inputs:  # the last one is refused: nothing follows it
        await call.write(message)
    assert await call.code() == code
    assert says in str(await call.details())
    assert os.listdir(tmp_path / "workspace") == ["ran"]


async def test_an_execution_must_begin_with_its_request(stub: Stub, tmp_path: Path) -> None:
    call = stub.Session(metadata=KEYED)
    await call.write(_chunk("a.txt"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert os.listdir(tmp_path / "workspace") == []


async def test_an_execution_without_a_timeout_is_refused(stub: Stub, tmp_path: Path) -> None:
    session = stub.Session(metadata=KEYED)
    await session.write(executor_pb2.ExecuteInput(request=_request(timeout=0)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await session.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert os.listdir(tmp_path / "workspace") == []


def test_the_key_is_taken_from_its_file_which_goes(tmp_path: Path) -> None:
    (tmp_path / "executor.key").write_text("k3y")
    assert _take_key(tmp_path / "executor.key") == "k3y"
    assert not (tmp_path / "executor.key").exists()
    with pytest.raises(SystemExit, match="refusing to serve"):
        _take_key(tmp_path / "executor.key")
