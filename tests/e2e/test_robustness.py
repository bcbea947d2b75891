"""Lifecycle you can trust: containers dying underneath, concurrency, cancellation, deletes
during executions, controller restarts (SIGTERM and SIGKILL), and a podman service that breaks,
against real podman."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import ControllerDirs, delete_all, start_controller_process
from controller.app import Controller, start_controller
from controller.config import Config
from controller.runtime import podman_service
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.conftest import CreateSandbox
from tests.e2e.helpers import PARENT, PROJECT, execute, kill_executor, podman, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

    StreamCall = grpc.aio.StreamStreamCall[
        sandbox_pb2.StreamExecuteCodeRequest, sandbox_pb2.StreamExecuteCodeResponse
    ]

pytestmark = pytest.mark.e2e
RUNNING, TERMINATED = sandbox_pb2.Sandbox.RUNNING, sandbox_pb2.Sandbox.TERMINATED
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
IMAGE_REPOSITORY = os.environ.get("PETRI_IMAGE_REPOSITORY", "localhost/petri-sandbox")
TEST_PROFILE = os.environ.get("PETRI_TEST_IMAGE_PROFILE", "test")
# The checkout these tests run from, for a controller started elsewhere (client/: `petri`).
REPO = Path(__file__).resolve().parents[2]


async def running(stub: Stub, name: str, code: str) -> StreamCall:
    """Starts code on a StreamExecuteCode call and returns the call once the code's first
    stdout has arrived: from then on the code is running."""

    async def requests() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
        message = sandbox_pb2.StreamExecuteCodeRequest(
            start=sandbox_pb2.ExecuteCodeStart(name=name, code=code)
        )
        message.start.timeout.FromSeconds(120)
        yield message

    call = stub.StreamExecuteCode(requests())
    first = await asyncio.wait_for(call.read(), 60)
    assert isinstance(first, sandbox_pb2.StreamExecuteCodeResponse), first
    assert first.WhichOneof("event") == "stdout", first
    return call


async def rest_of(call: StreamCall) -> list[sandbox_pb2.StreamExecuteCodeResponse]:
    """The call's remaining events; raises its error status."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        assert isinstance(event, sandbox_pb2.StreamExecuteCodeResponse), event
        events.append(event)
    return events


async def wait_state(stub: Stub, name: str, state: int, within: float = 15) -> sandbox_pb2.Sandbox:
    deadline = time.monotonic() + within
    while True:
        got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name))
        if got.state == state or time.monotonic() > deadline:
            assert got.state == state, got
            return got
        await asyncio.sleep(0.2)


def containers() -> set[str]:
    return set(podman("ps", "-a", "--format", "{{.Names}}").split())


async def test_a_container_removed_behind_our_back_shows_terminated(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    podman("rm", "-f", f"petri-{sandbox.uid}")
    got = await wait_state(stub, sandbox.name, TERMINATED)
    assert got.state_message == "its container is gone, and it had no checkpoint"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(stub, sandbox.name, "1")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is TERMINATED: its container is gone" in (caught.value.details() or "")


async def test_killing_the_executor_inside_is_terminated_not_a_hang(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    call = await running(stub, sandbox.name, "import time\nprint('go', flush=True)\ntime.sleep(30)")
    # What user code cannot do (see test_isolation), the root of the sandbox can: kill -9
    # the executor (PID 1's child).
    kill_executor(f"petri-{sandbox.uid}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(rest_of(call), 30)
    assert caught.value.code() in (  # the code was sent: UNKNOWN, not UNAVAILABLE (retry)
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    got = await wait_state(stub, sandbox.name, TERMINATED)
    assert "its container" in got.state_message


async def test_concurrent_executions_on_one_sandbox_run_in_arrival_order(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "order = []")
    calls = []
    for i in range(10):
        code = f"import random, time\ntime.sleep(random.random() / 20)\norder.append({i})"
        calls.append(asyncio.create_task(execute(stub, sandbox.name, code)))
        await asyncio.sleep(0.01)  # a well-defined arrival order
    responses = await asyncio.gather(*calls)
    assert [r.execution_count for r in responses] == list(range(2, 12))
    assert value_of(await execute(stub, sandbox.name, "order")) == str(list(range(10)))


async def test_different_sandboxes_run_in_parallel(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    one, two = await create_sandbox(), await create_sandbox()
    code = "import time\nstart = time.time()\ntime.sleep(1.5)\n(start, time.time())"
    first, second = await asyncio.gather(
        execute(stub, one.name, code), execute(stub, two.name, code)
    )
    (start_1, end_1), (start_2, end_2) = (eval(value_of(r) or "") for r in (first, second))
    assert start_2 < end_1 and start_1 < end_2  # the two ran at the same time


async def test_ignoring_the_interrupt_gets_the_interpreter_killed_and_says_so(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "kept = 1")
    response = await execute(
        stub,
        sandbox.name,
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
        timeout={"seconds": 1},
    )
    assert response.error.kind == execution_pb2.ExecutionError.TIMEOUT
    assert response.namespace_reset and "variables and imports are lost" in response.error.evalue
    assert response.incarnation != sandbox.incarnation
    after = await execute(stub, sandbox.name, "kept")
    assert after.error.ename == "NameError"


async def test_a_cancelled_call_interrupts_its_code(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "import time\nn = 0")
    loop = "while True:\n    n += 1\n    if n == 1: print('go', flush=True)\n    time.sleep(0.01)"
    call = await running(stub, sandbox.name, loop)
    call.cancel()
    # Executions run one at a time: this one starts once the cancelled one has stopped. It
    # outlasts the controller's check that the executor still answers (kill grace of 1 s and
    # 5 s), which asks it while the code runs.
    first = value_of(await execute(stub, sandbox.name, "time.sleep(7)\nn"))
    await asyncio.sleep(0.5)
    second = value_of(await execute(stub, sandbox.name, "n"))
    assert first == second and int(first or 0) > 0  # stopped, and its variables kept
    # That check found it answering.
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert got.state == sandbox_pb2.Sandbox.RUNNING, got.state_message


async def test_delete_during_an_execution_ends_it_cleanly(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    sandbox = await create_sandbox()
    call = await running(stub, sandbox.name, "import time\nprint('go', flush=True)\ntime.sleep(60)")
    started = time.monotonic()
    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rest_of(call)
    assert time.monotonic() - started < 30
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "deleted during the execution" in (caught.value.details() or "")
    assert f"petri-{sandbox.uid}" not in containers()


async def test_many_concurrent_creates_neither_corrupt_nor_leak(
    stub: Stub, controller: Controller
) -> None:
    label = f"io.petri.registry={controller.manager.registry_label}"
    before = set(podman("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}").split())
    created = await asyncio.gather(
        *(
            stub.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(
                    parent=PARENT, sandbox=sandbox_pb2.Sandbox(labels={"burst": "yes"})
                )
            )
            for _ in range(10)
        )
    )
    assert len({s.uid for s in created}) == 10 and all(s.state == RUNNING for s in created)
    listed = await stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter="labels.burst = yes")
    )
    assert {s.name for s in listed.sandboxes} == {s.name for s in created}
    await asyncio.gather(
        *(stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=s.name)) for s in created)
    )
    after = set(podman("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}").split())
    assert after == before


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_a_restart_loses_nothing(how: str) -> None:
    dirs = ControllerDirs.fresh()
    first = await start_controller_process(dirs)
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            keep = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            await execute(stub, keep.name, "x = 'before'\nopen('f.txt', 'w').write('file')")
            lost = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            short = sandbox_pb2.Sandbox()
            short.ttl.FromSeconds(6)
            expiring = await stub.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=short)
            )
        registry_label = podman(
            "inspect",
            "--format",
            '{{index .Config.Labels "io.petri.registry"}}',
            f"petri-{keep.uid}",
        ).strip()
        if how == "SIGKILL":
            first.process.kill()
        else:
            first.process.terminate()  # a graceful stop pauses every sandbox to disk
        first.process.wait(30)
        # While the controller is down: one sandbox's container disappears (after SIGTERM,
        # there is none left: all paused), and a container with the controller's labels
        # appears that the registry does not know (a crash between "podman create" and the
        # registry write leaves such a thing).
        left = podman("ps", "-a", "--filter", f"label=io.petri.registry={registry_label}")
        assert (f"petri-{keep.uid}" in left) == (how == "SIGKILL")
        if how == "SIGKILL":
            podman("rm", "-f", f"petri-{lost.uid}")
        podman(
            "create",
            "--name",
            "petri-orphan-test",
            "--network",
            "none",
            "--label",
            "io.petri.managed=true",
            "--label",
            f"io.petri.registry={registry_label}",
            f"{IMAGE_REPOSITORY}:{TEST_PROFILE}",
            "true",
        )

        second = await start_controller_process(dirs)
        try:
            async with grpc.aio.insecure_channel(second.address) as channel:
                stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
                response = await execute(stub, keep.name, "(x, open('f.txt').read())")
                assert value_of(response) == "('before', 'file')"
                assert response.namespace_restored == (how == "SIGTERM")
                got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=lost.name))
                if how == "SIGKILL":  # its container went, and it had no checkpoint
                    assert got.state == TERMINATED and "gone" in got.state_message
                else:  # paused: nothing was lost
                    assert got.state == sandbox_pb2.Sandbox.PAUSED
                assert "petri-orphan-test" not in containers()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    try:
                        await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=expiring.name))
                    except grpc.aio.AioRpcError as exc:
                        assert "expired at" in (exc.details() or "")
                        break
                    await asyncio.sleep(0.3)
                else:
                    pytest.fail("the sandbox did not expire after the restart")
        finally:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await delete_all(second.address, PROJECT)
            second.process.terminate()
            second.process.wait(30)
    finally:
        if first.process.poll() is None:
            first.process.kill()
        with contextlib.suppress(Exception):
            podman("rm", "-f", "petri-orphan-test")
        dirs.remove()


async def test_sigterm_lets_an_execution_in_flight_finish() -> None:
    dirs = ControllerDirs.fresh()
    started = await start_controller_process(dirs)
    try:
        async with grpc.aio.insecure_channel(started.address) as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            call = await running(
                stub,
                sandbox.name,
                "import time\nprint('go', flush=True)\ntime.sleep(2)\n'finished'",
            )
            started.process.terminate()
            events = await rest_of(call)
            values = [
                e.output.text["text/plain"] for e in events if e.WhichOneof("event") == "output"
            ]
            assert values == ["'finished'"] and events[-1].WhichOneof("event") == "result"
        assert await asyncio.to_thread(started.process.wait, 30) == 0
        # The sandbox outlives the controller, paused after its execution, for the next one.
        assert f"petri-{sandbox.uid}" not in containers()
        second = await start_controller_process(dirs)
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
            assert got.state == sandbox_pb2.Sandbox.PAUSED and got.execution_count == 1
        await delete_all(second.address, PROJECT)
        second.process.terminate()
        second.process.wait(30)
    finally:
        if started.process.poll() is None:
            started.process.kill()
        dirs.remove()


async def health_statuses(address: str, seen: asyncio.Queue[int]) -> None:
    """Puts every status the health service's Watch reports on `seen`."""
    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        async for answer in watch:
            await seen.put(answer.status)


async def wait_status(seen: asyncio.Queue[int], status: int, within: float) -> None:
    async with asyncio.timeout(within):
        while await seen.get() != status:
            pass


@pytest.mark.parametrize("how", ["killed", "socket deleted", "hung", "working directory deleted"])
async def test_a_broken_podman_service_is_reported_and_healed(
    how: str, e2e_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = ControllerDirs.fresh()
    config = dataclasses.replace(e2e_config, state_dir=dirs.state_dir, runtime_dir=dirs.runtime_dir)
    doomed = Path(tempfile.mkdtemp(prefix="petri-doomed-"))
    if how == "working directory deleted":  # as a service started from a re-staged copy was
        monkeypatch.setattr(podman_service, "WORKING_DIRECTORY", str(doomed))
    controller = await start_controller(config)
    monkeypatch.setattr(podman_service, "WORKING_DIRECTORY", "/")  # for the restart
    service = controller.podman_service
    assert service is not None and service.pid is not None
    address = f"127.0.0.1:{controller.port}"
    seen: asyncio.Queue[int] = asyncio.Queue()
    watching = asyncio.create_task(health_statuses(address, seen))
    try:
        await wait_status(seen, SERVING, 10)
        broken = time.monotonic()
        if how == "killed":
            os.kill(service.pid, signal.SIGKILL)
        elif how == "socket deleted":
            service.socket_path.unlink()
        elif how == "hung":  # alive, its socket there, but it answers nothing
            os.kill(service.pid, signal.SIGSTOP)
        else:  # conmon then fails every start: "Failed to get working directory"
            shutil.rmtree(doomed)
        await wait_status(seen, NOT_SERVING, 15)
        await wait_status(seen, SERVING, 30)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            assert value_of(await execute(stub, sandbox.name, "6 * 7")) == "42"
            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
        assert time.monotonic() - broken < 30
        assert service.restarts == 1 and service.problem() is None
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        with contextlib.suppress(ProcessLookupError):
            if service.pid is not None:
                os.kill(service.pid, signal.SIGCONT)
        await controller.stop(grace=1)
        dirs.remove()
        shutil.rmtree(doomed, ignore_errors=True)


async def test_health_is_not_serving_while_an_outside_podman_cannot_start_containers(
    e2e_config: Config,
) -> None:
    # A podman service the controller was given (--podman-socket), not its own to restart,
    # that cannot start containers: its working directory was deleted.
    dirs = ControllerDirs.fresh()
    socket_path = dirs.runtime_dir / "outside.sock"
    doomed = Path(tempfile.mkdtemp(prefix="petri-doomed-"))

    def outside_service(cwd: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{socket_path}"], cwd=cwd
        )

    async def wait_socket() -> None:
        for _ in range(300):
            if socket_path.exists():
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"podman did not create {socket_path} in 15 s")

    outside = outside_service(doomed)
    controller = None
    watching = None
    try:
        await wait_socket()
        config = dataclasses.replace(
            e2e_config,
            state_dir=dirs.state_dir,
            runtime_dir=dirs.runtime_dir,
            podman_socket=socket_path,
        )
        controller = await start_controller(config)
        address = f"127.0.0.1:{controller.port}"
        seen: asyncio.Queue[int] = asyncio.Queue()
        watching = asyncio.create_task(health_statuses(address, seen))
        await wait_status(seen, SERVING, 10)
        shutil.rmtree(doomed)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await wait_status(seen, NOT_SERVING, 15)
            # Its operator restarts it, from a directory that stays.
            outside.terminate()
            outside.wait(30)
            socket_path.unlink(missing_ok=True)
            outside = outside_service(Path("/"))
            await wait_socket()
            await wait_status(seen, SERVING, 30)
            sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    finally:
        if watching is not None:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        if controller is not None:
            await controller.stop(grace=1)
        outside.terminate()
        outside.wait(30)
        dirs.remove()
        shutil.rmtree(doomed, ignore_errors=True)


async def test_sandboxes_start_after_the_controllers_working_directory_is_deleted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # scripts/up ran the controller from a staged copy that another script then replaced:
    # conmon, started by a podman service that shares a deleted working directory, then
    # fails every container start ("[conmon:e] Failed to get working directory").
    staged = Path(tempfile.mkdtemp(prefix="petri-staged-"))
    monkeypatch.chdir(staged)
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{REPO / 'client'}" + (f":{path}" if path else ""))
    dirs = ControllerDirs.fresh()
    started = await start_controller_process(dirs, default_image_profile=TEST_PROFILE)
    try:
        shutil.rmtree(staged)
        async with grpc.aio.insecure_channel(started.address) as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            assert value_of(await execute(stub, sandbox.name, "6 * 7")) == "42"
            await delete_all(started.address, PROJECT)
    finally:
        started.process.terminate()
        started.process.wait(30)
        dirs.remove()
