"""What callers can make the controller hold: a request without a valid token is never read,
and the request data of a caller's calls in progress is bounded. Through a controller process
of its own that requires tokens, so that its memory is measured alone."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.harness import ControllerDirs, RunningController, channel_to, start_controller_process
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import podman

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
MiB = 1 << 20
TOKEN = ("authorization", "Bearer memory-token")
PARENT = "projects/memory"


def _kib_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {name} in /proc/{pid}/status")


async def _wait_rss_below(pid: int, limit: int) -> int:
    """Waits for the process's RSS to fall to `limit`; returns the last reading."""
    deadline = time.monotonic() + 30
    while True:
        rss = _kib_field(pid, "VmRSS")
        if rss <= limit or time.monotonic() > deadline:
            return rss
        await asyncio.sleep(0.2)  # RSS is polled: no event says it fell


@pytest.fixture
async def guarded() -> AsyncIterator[RunningController]:
    """A controller process that requires a token; a caller may hold 120 MiB of requests."""
    dirs = ControllerDirs.fresh()
    tokens = dirs.state_dir / "tokens.toml"
    digest = hashlib.sha256(b"memory-token").hexdigest()
    tokens.write_text(
        f'[[tokens]]\nname = "memory-caller"\nprojects = ["memory"]\nsha256 = "{digest}"\n'
    )
    try:
        running = await start_controller_process(
            dirs,
            tokens_file=str(tokens),
            warm_pool="",
            default_image_profile=os.environ.get("PETRI_TEST_IMAGE_PROFILE", "test"),
            max_request_bytes_in_flight_per_caller="120MiB",
        )
    except BaseException:
        dirs.remove()
        raise
    try:
        yield running
    finally:
        running.process.terminate()
        running.process.wait(30)
        dirs.remove()


@pytest.fixture
async def guarded_stub(guarded: RunningController) -> AsyncIterator[Stub]:
    async with channel_to(guarded.address) as channel:
        yield sandbox_pb2_grpc.SandboxServiceStub(channel)


async def _status_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_requests_without_a_token_are_refused_unread(
    guarded: RunningController, guarded_stub: Stub
) -> None:
    pid = guarded.process.pid
    before = _kib_field(pid, "VmRSS")
    huge = sandbox_pb2.ExecuteCodeRequest(name=f"{PARENT}/sandboxes/any", code="#" * (100 * MiB))
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        answers = await asyncio.gather(
            *(_status_of(guarded_stub.ExecuteCode(huge, metadata=metadata)) for _ in range(4))
        )
        assert {code for code, _ in answers} == {grpc.StatusCode.UNAUTHENTICATED}, answers
    # Reading them would cost some 300 MiB each; unread, they cost only the transport's
    # buffers (flow control: well under 1 MiB a call).
    assert _kib_field(pid, "VmHWM") - before < 128 * MiB
    # Health's Check is open (probes send no token), and answered without reading either.
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="x" * 1000))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=(TOKEN,))
        assert (await anext(aiter(watch))).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        code, _ = await _status_of(anext(aiter(health.Watch(health_pb2.HealthCheckRequest()))))
        assert code == grpc.StatusCode.UNAUTHENTICATED, _
        # Reflection reads its requests: it takes a token.
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        # (It sends nothing: the asyncio client may report a write that meets the refusal as
        # INTERNAL instead of the server's status, grpc/grpc#36066.)
        code, _ = await _status_of(_first(reflection.ServerReflectionInfo(_nothing())))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        first = await _first(reflection.ServerReflectionInfo(iter([listing]), metadata=(TOKEN,)))
        names = {s.name for s in first.list_services_response.service}
        assert "petri.v1.SandboxService" in names


async def _nothing() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
    await asyncio.Event().wait()
    yield reflection_pb2.ServerReflectionRequest()


async def _first(
    responses: AsyncIterator[reflection_pb2.ServerReflectionResponse],
) -> reflection_pb2.ServerReflectionResponse:
    async for response in responses:
        return response
    raise AssertionError("no response")


WAIT_FOR_RELEASE = """
import os, time
print('waiting', flush=True)
while not os.path.exists('release'):
    time.sleep(0.05)
"""


async def test_request_data_in_flight_is_bounded_per_caller(
    guarded: RunningController, guarded_stub: Stub
) -> None:
    stub = guarded_stub
    sandbox = await stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent=PARENT), metadata=(TOKEN,)
    )
    try:
        # A running execution keeps the sandbox busy: the calls below queue behind it,
        # holding their requests.
        start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code=WAIT_FOR_RELEASE)
        busy = stub.StreamExecuteCode(
            iter([sandbox_pb2.StreamExecuteCodeRequest(start=start)]), metadata=(TOKEN,)
        )
        first = await anext(aiter(busy))
        assert first.stdout.startswith("waiting")
        before = _kib_field(guarded.process.pid, "VmRSS")
        big = sandbox_pb2.ExecuteCodeRequest(
            name=sandbox.name,
            code="import os\nos.path.getsize('in.bin')",
            files=[execution_pb2.File(path="in.bin", content=b"\0" * (64 * MiB))],
        )
        calls = [
            asyncio.create_task(_status_of(stub.ExecuteCode(big, metadata=(TOKEN,))))
            for _ in range(2)
        ]
        # Two 64 MiB requests exceed the caller's 120 MiB: one is refused, whichever is last.
        done, pending = await asyncio.wait(calls, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 1
        code, details = done.pop().result()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "too much request data in flight for memory-caller" in details
        assert "120.0 MiB per caller" in details and "retrying" in details
        podman("exec", f"petri-{sandbox.uid}", "touch", "/workspace/release")
        async for _ in busy:
            pass
        assert await pending.pop() == (grpc.StatusCode.OK, "")
        del big
        # Memory returns to where it was once the calls are over.
        settled = await _wait_rss_below(guarded.process.pid, before + 32 * MiB)
        assert settled <= before + 32 * MiB, (settled, before)
    finally:
        await stub.DeleteSandbox(
            sandbox_pb2.DeleteSandboxRequest(name=sandbox.name), metadata=(TOKEN,)
        )
