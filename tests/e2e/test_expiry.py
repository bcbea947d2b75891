"""Sandboxes die at their TTL: not before, soon after, with a tombstone that says so."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc
import pytest

from petri.v1 import sandbox_pb2
from tests.conftest import CreateSandbox
from tests.e2e.helpers import execute, podman, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e


async def wait_gone(stub: Stub, name: str, within: float) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return exc.details() or ""
        await asyncio.sleep(0.2)
    pytest.fail(f"{name} still exists {within} s later")


async def test_a_sandbox_lives_until_its_ttl_and_is_reaped_soon_after(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    sandbox = sandbox_pb2.Sandbox()
    sandbox.ttl.FromSeconds(3)
    created = await create_sandbox(ttl=sandbox.ttl)
    expire_time = created.expire_time.ToDatetime()
    assert value_of(await execute(stub, created.name, "'alive'")) == "'alive'"

    details = await wait_gone(stub, created.name, within=15)
    gone_at = time.time()
    assert "was expired at" in details
    assert gone_at >= expire_time.timestamp() - 0.5  # never before (clock granularity aside)
    assert f"petri-{created.uid}" not in podman("ps", "-a", "--format", "{{.Names}}").split()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(stub, created.name, "1")
    assert "expired at" in (caught.value.details() or "")


async def test_extending_the_ttl_keeps_a_sandbox_alive(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    sandbox = sandbox_pb2.Sandbox()
    sandbox.ttl.FromSeconds(2)
    created = await create_sandbox(ttl=sandbox.ttl)
    update = sandbox_pb2.Sandbox(name=created.name)
    update.ttl.FromSeconds(600)
    request = sandbox_pb2.UpdateSandboxRequest(sandbox=update)
    request.update_mask.paths.append("ttl")
    await stub.UpdateSandbox(request)
    await asyncio.sleep(4)
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=created.name))
    assert got.state == sandbox_pb2.Sandbox.RUNNING


async def test_shortening_the_ttl_makes_a_sandbox_expire_sooner(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    created = await create_sandbox()  # the default hour
    update = sandbox_pb2.Sandbox(name=created.name)
    update.ttl.FromSeconds(2)
    request = sandbox_pb2.UpdateSandboxRequest(sandbox=update)
    request.update_mask.paths.append("ttl")
    updated = await stub.UpdateSandbox(request)
    assert updated.expire_time.ToDatetime() < created.expire_time.ToDatetime()
    assert "was expired at" in await wait_gone(stub, created.name, within=15)
