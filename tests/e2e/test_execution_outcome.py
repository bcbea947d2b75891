"""What a failed execution tells its caller about its code: an upload refused or stalled ran
nothing and wrote nothing; an executor that dies or stops answering after the code was sent
says the code may have run (never "retry"), and a stuck one leaves its sandbox TERMINATED."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, execute, podman, sibling_config, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e

WRITES_RAN = "open('ran', 'w').write('x')"
LEFT_BEHIND = "import os\n(os.path.exists('good.txt'), os.path.exists('ran'))"


def _start(name: str, code: str, timeout: int) -> sandbox_pb2.StreamExecuteCodeRequest:
    message = sandbox_pb2.StreamExecuteCodeRequest(
        start=sandbox_pb2.ExecuteCodeStart(name=name, code=code)
    )
    message.start.timeout.FromSeconds(timeout)
    return message


def _chunk(path: str, data: bytes = b"g") -> sandbox_pb2.StreamExecuteCodeRequest:
    return sandbox_pb2.StreamExecuteCodeRequest(
        input_chunk=execution_pb2.FileChunk(path=path, data=data, final=True)
    )


@pytest.fixture(scope="module")
async def impatient(
    e2e_config: Config, controller: Controller, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stub]:
    """A controller that waits one second beyond an execution's timeout and kill grace, and
    takes 1 KiB of input files per execution."""
    config = sibling_config(
        e2e_config,
        controller,
        "impatient",
        state_dir=tmp_path_factory.mktemp("impatient"),
        executor_slack=timedelta(seconds=1),
        max_input_bytes=1024,
    )
    running = await start_controller(config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        yield stub
        page = await stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
        for sandbox in page.sandboxes:
            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    await running.stop(grace=1)


async def test_an_input_refused_at_a_file_boundary_writes_and_runs_nothing(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    """The controller refuses `../x` after `good.txt` went through to the executor; the
    executor used to take the cancelled call for a complete one (roughly 1 try in 3 to 12)."""
    for _ in range(30):
        requests = [_start(sandbox.name, WRITES_RAN, 30), _chunk("good.txt"), _chunk("../x")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.StreamExecuteCode(iter(requests)):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert value_of(await execute(stub, sandbox.name, LEFT_BEHIND)) == "(False, False)"


async def test_an_upload_over_the_limit_writes_and_runs_nothing(impatient: Stub) -> None:
    sandbox = await impatient.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox_pb2.Sandbox())
    )
    for _ in range(30):
        big = _chunk("big.bin", b"x" * 2048)
        requests = [_start(sandbox.name, WRITES_RAN, 30), _chunk("good.txt"), big]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in impatient.StreamExecuteCode(iter(requests)):
                pass
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert value_of(await execute(impatient, sandbox.name, LEFT_BEHIND)) == "(False, False)"


async def test_an_upload_that_stalls_writes_and_runs_nothing(impatient: Stub) -> None:
    sandbox = await impatient.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox_pb2.Sandbox())
    )
    finished = asyncio.Event()

    async def stalled() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
        yield _start(sandbox.name, WRITES_RAN, 1)
        yield _chunk("good.txt")
        await finished.wait()  # never half-closes while the call lasts

    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in impatient.StreamExecuteCode(stalled()):
                pass
    finally:
        finished.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "nothing ran" in (caught.value.details() or "")
    assert value_of(await execute(impatient, sandbox.name, LEFT_BEHIND)) == "(False, False)"


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_an_upload_its_client_abandons_writes_and_runs_nothing(
    stub: Stub, sandbox: sandbox_pb2.Sandbox, how: str
) -> None:
    """A client that cancels, or whose deadline passes, after a complete file but before its
    half-close: grpc.aio ends the controller's request stream as if it had half-closed."""
    for wait in (0.0, 0.01, 0.05, 0.2, 0.5):  # the call ends at various points of the upload
        finished = asyncio.Event()

        async def abandoned(
            finished: asyncio.Event = finished,
        ) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
            yield _start(sandbox.name, WRITES_RAN, 30)
            yield _chunk("good.txt")
            await finished.wait()  # never half-closes while the call lasts

        timeout = wait + 0.05 if how == "deadline" else None
        call = stub.StreamExecuteCode(abandoned(), timeout=timeout)
        try:
            if how == "cancel":
                await asyncio.sleep(wait)
                call.cancel()
            with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
                async for _ in call:
                    pass
        finally:
            finished.set()
        assert value_of(await execute(stub, sandbox.name, LEFT_BEHIND)) == "(False, False)"


async def test_files_of_one_request_that_need_each_other_as_directories_write_nothing(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    for paths in (["a/b", "a/b/c"], ["a/b/c", "a/b"]):
        request = sandbox_pb2.ExecuteCodeRequest(
            name=sandbox.name,
            code=WRITES_RAN,
            files=[execution_pb2.File(path=path, content=b"x") for path in paths],
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteCode(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot both be written" in (caught.value.details() or "")
        check = "import os\n(os.path.exists('a'), os.path.exists('ran'))"
        assert value_of(await execute(stub, sandbox.name, check)) == "(False, False)"


async def test_an_input_path_at_the_length_limit_is_written_again_and_one_byte_more_refused(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    """/workspace/ and the longest path fit PATH_MAX: the second upload, whose directories
    exist, used to fail in the executor (ENAMETOOLONG) and say the code may have run."""
    longest = "/".join(["d" * 240] * 16) + "/" + "f" * (4084 - 16 * 241)
    assert len(longest) == 4084
    for attempt in range(2):
        code = f"open('ran{attempt}', 'w').write('x')\nlen(open({longest!r}).read())"
        request = sandbox_pb2.ExecuteCodeRequest(
            name=sandbox.name, code=code, files=[execution_pb2.File(path=longest, content=b"xy")]
        )
        assert value_of(await stub.ExecuteCode(request)) == "2"
    too_long = sandbox_pb2.ExecuteCodeRequest(
        name=sandbox.name, code="1", files=[execution_pb2.File(path=longest + "g", content=b"")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteCode(too_long)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than 4084 bytes" in (caught.value.details() or "")
    await execute(stub, sandbox.name, "import shutil\nshutil.rmtree('d' * 240)")


async def test_an_executor_killed_mid_execution_says_the_code_may_have_run(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    events = stub.StreamExecuteCode(iter([_start(sandbox.name, code, 120)]))
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in events:
            seen.append(event)
            if "started" in event.stdout:
                podman("kill", f"petri-{sandbox.uid}")  # PID 1, from the host
    assert any("started" in event.stdout for event in seen), seen
    details = caught.value.details() or ""
    assert caught.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.FAILED_PRECONDITION)
    assert "may have run" in details and "retry" not in details, details


async def test_a_stuck_executor_leaves_its_sandbox_terminated(impatient: Stub) -> None:
    sandbox = await impatient.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox_pb2.Sandbox())
    )
    assert value_of(await execute(impatient, sandbox.name, "1")) == "1"
    container = f"petri-{sandbox.uid}"
    # The executor (PID 1's child) stopped: alive, answering nothing.
    podman("exec", container, "sh", "-c", "kill -STOP $(cat /proc/1/task/1/children)")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(impatient, sandbox.name, "2", timeout={"seconds": 1})
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.UNKNOWN, details
    assert "may have run" in details and "retry" not in details, details
    got = await impatient.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert got.state == sandbox_pb2.Sandbox.TERMINATED
    assert "executor stopped answering" in got.state_message
    assert container not in podman("ps", "-a", "--format", "{{.Names}}").split()


async def test_a_stuck_executor_is_found_when_its_caller_gives_up_first(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    """The caller's deadline is far shorter than the execution's timeout, the kill grace and
    the executor slack: the controller still finds the stuck executor, within the kill grace
    and a few seconds of the caller leaving."""
    assert value_of(await execute(stub, sandbox.name, "1")) == "1"
    container = f"petri-{sandbox.uid}"
    podman("exec", container, "sh", "-c", "kill -STOP $(cat /proc/1/task/1/children)")
    loop = asyncio.get_running_loop()
    left = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(
                name=sandbox.name, code="2", timeout=Duration(seconds=20)
            ),
            timeout=3,
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Without the check it would take 20 s + kill grace + executor slack (30 s by default).
    # A poll: the check runs in the controller's background; TERMINATED comes before the
    # container's removal.
    while True:
        got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
        removed = container not in podman("ps", "-a", "--format", "{{.Names}}").split()
        if (got.state == sandbox_pb2.Sandbox.TERMINATED and removed) or loop.time() - left > 20:
            break
        await asyncio.sleep(0.2)
    assert got.state == sandbox_pb2.Sandbox.TERMINATED, got
    assert "executor stopped answering" in got.state_message
    assert "caller left" in got.state_message
    assert removed
