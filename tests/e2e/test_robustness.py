"""Lifecycle you can trust: containers dying underneath, concurrency, cancellation, deletes
during executions, and controller restarts (SIGTERM and SIGKILL) against real podman."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import grpc
import pytest

from bench.harness import ControllerDirs, delete_all, start_controller_process
from controller.server import Controller
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.conftest import CreateSandbox
from tests.e2e.helpers import PARENT, PROJECT, execute, kill_executor, podman, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
RUNNING, TERMINATED = sandbox_pb2.Sandbox.RUNNING, sandbox_pb2.Sandbox.TERMINATED


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
    assert got.state_message == "its container is gone"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(stub, sandbox.name, "1")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is TERMINATED: its container is gone" in (caught.value.details() or "")


async def test_killing_the_executor_inside_is_terminated_not_a_hang(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    running = asyncio.create_task(execute(stub, sandbox.name, "import time\ntime.sleep(30)"))
    await asyncio.sleep(1)
    # What user code cannot do (see test_isolation), the root of the sandbox can: kill -9
    # the executor (PID 1's child).
    kill_executor(f"petri-{sandbox.uid}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(running, 30)
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
    running = asyncio.create_task(
        execute(stub, sandbox.name, "while True:\n    n += 1\n    time.sleep(0.01)")
    )
    await asyncio.sleep(1.5)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    first = value_of(await execute(stub, sandbox.name, "n"))
    await asyncio.sleep(0.5)
    second = value_of(await execute(stub, sandbox.name, "n"))
    assert first == second and int(first or 0) > 0  # stopped, and its variables kept


async def test_delete_during_an_execution_ends_it_cleanly(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    sandbox = await create_sandbox()
    running = asyncio.create_task(execute(stub, sandbox.name, "import time\ntime.sleep(60)"))
    await asyncio.sleep(1)
    started = time.monotonic()
    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running
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
        if how == "SIGKILL":
            first.process.kill()
        else:
            first.process.terminate()
        first.process.wait(30)
        # While the controller is down: one sandbox's container disappears, and a container
        # with the controller's labels appears that the registry does not know (a crash
        # between "podman create" and the registry write leaves such a thing).
        podman("rm", "-f", f"petri-{lost.uid}")
        registry_label = podman(
            "inspect",
            "--format",
            '{{index .Config.Labels "io.petri.registry"}}',
            f"petri-{keep.uid}",
        ).strip()
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
            "localhost/petri-sandbox:test",
            "true",
        )

        second = await start_controller_process(dirs)
        try:
            async with grpc.aio.insecure_channel(second.address) as channel:
                stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
                response = await execute(stub, keep.name, "(x, open('f.txt').read())")
                assert value_of(response) == "('before', 'file')"
                got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=lost.name))
                assert got.state == TERMINATED and "gone" in got.state_message
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
    running = await start_controller_process(dirs)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            call = asyncio.create_task(
                execute(stub, sandbox.name, "import time\ntime.sleep(2)\n'finished'")
            )
            await asyncio.sleep(0.5)
            running.process.terminate()
            response = await call
            assert value_of(response) == "'finished'"
        assert await asyncio.to_thread(running.process.wait, 30) == 0
        # The sandbox outlives the controller, for the next one to adopt.
        assert f"petri-{sandbox.uid}" in containers()
        second = await start_controller_process(dirs)
        await delete_all(second.address, PROJECT)
        second.process.terminate()
        second.process.wait(30)
    finally:
        if running.process.poll() is None:
            running.process.kill()
        dirs.remove()
