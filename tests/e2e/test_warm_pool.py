"""The warm pool and preloaded interpreters, through the real API into real sandboxes.

A controller of its own keeps two sandboxes of the suite's default kind ready; what a user
sees: creates that take a pool member (its container existed before the call), names, labels
and TTLs applied at the claim, members never shown, counted, shared or reused, and pandas
already imported in every interpreter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from controller.app import Controller, start_controller
from controller.config import Config
from controller.sandboxes.warm_pool import PoolTarget
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, execute, podman, sibling_config, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e

POOL_SIZE = 2


@pytest.fixture(scope="module")
async def pooled(e2e_config: Config, controller: Controller) -> AsyncIterator[Controller]:
    config = sibling_config(
        e2e_config,
        controller,
        "pool",
        state_dir=e2e_config.state_dir / "pool",
        warm_pool=(PoolTarget(size=POOL_SIZE),),
        max_sandboxes_per_project=3,
    )
    running = await start_controller(config)
    yield running
    await running.stop(grace=1)
    assert not managed_uids(running)  # members, ready or starting, went with it


@pytest.fixture
async def pool_stub(pooled: Controller) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{pooled.port}") as channel:
        stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        yield stub
        listed = await stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
        for sandbox in listed.sandboxes:
            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))


def managed_uids(controller: Controller) -> set[str]:
    """The uids of this controller's containers, as podman labels them."""
    label = f"io.petri.registry={controller.manager.registry_label}"
    out = podman("ps", "--filter", f"label={label}", "--format", '{{index .Labels "io.petri.uid"}}')
    return set(out.split())


async def full_pool(controller: Controller, timeout: float = 90) -> set[str]:
    """Waits until the pool holds POOL_SIZE ready members; returns their uids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = controller.manager.warm_pool.ready_uids()
        if len(ready) == POOL_SIZE:
            return ready
        await asyncio.sleep(0.1)
    raise AssertionError(f"the pool did not refill in {timeout} s")


async def create(stub: Stub, **fields: object) -> sandbox_pb2.Sandbox:
    request = sandbox_pb2.CreateSandboxRequest(parent=PARENT, **fields)  # type: ignore[arg-type]
    sandbox: sandbox_pb2.Sandbox = await stub.CreateSandbox(request)
    return sandbox


async def test_create_claims_a_started_member_and_applies_its_request(
    pooled: Controller, pool_stub: Stub
) -> None:
    members = await full_pool(pooled)
    assert members <= managed_uids(pooled)  # real containers, started before any create
    listed = await pool_stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
    assert not listed.sandboxes  # and invisible

    before = datetime.now(UTC)
    sandbox = await create(
        pool_stub,
        sandbox_id="claimed",
        sandbox=sandbox_pb2.Sandbox(
            display_name="From the pool", labels={"team": "ml"}, ttl=Duration(seconds=600)
        ),
    )
    assert sandbox.uid in members
    assert sandbox.name == f"{PARENT}/sandboxes/claimed"
    assert sandbox.state == sandbox_pb2.Sandbox.RUNNING
    got = await pool_stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert (got.display_name, dict(got.labels)) == ("From the pool", {"team": "ml"})
    assert got.create_time.ToDatetime(UTC) >= before - timedelta(seconds=1)
    lifetime = got.expire_time.ToDatetime(UTC) - got.create_time.ToDatetime(UTC)
    assert lifetime.total_seconds() == pytest.approx(600, abs=5)
    listed = await pool_stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
    assert [s.name for s in listed.sandboxes] == [sandbox.name]
    response = await execute(pool_stub, sandbox.name, "x = 41\nx + 1")
    assert value_of(response) == "42" and response.execution_count == 1


async def test_members_are_never_shared_and_the_pool_refills(
    pooled: Controller, pool_stub: Stub
) -> None:
    await full_pool(pooled)
    sandboxes = await asyncio.gather(*(create(pool_stub) for _ in range(3)))
    uids = {s.uid for s in sandboxes}
    assert len(uids) == 3  # two from the pool, one cold: all different
    for sandbox in sandboxes:
        response = await execute(pool_stub, sandbox.name, "'secret' in globals()")
        assert value_of(response) == "False"
        await execute(pool_stub, sandbox.name, "secret = 1")
    refilled = await full_pool(pooled)
    assert not refilled & uids
    # A deleted sandbox goes for good: its container is not kept for someone else.
    await pool_stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandboxes[0].name))
    assert sandboxes[0].uid not in managed_uids(pooled)
    assert sandboxes[0].uid not in pooled.manager.warm_pool.ready_uids()


async def test_members_count_toward_no_quota_until_claimed(
    pooled: Controller, pool_stub: Stub
) -> None:
    await full_pool(pooled)
    for _ in range(3):  # the project's quota is 3; two members wait besides
        await create(pool_stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(pool_stub)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota of 3" in (caught.value.details() or "")
    await full_pool(pooled)  # the refused create gave its member back, unused


async def test_a_taken_name_leaves_the_member_in_the_pool(
    pooled: Controller, pool_stub: Stub
) -> None:
    await full_pool(pooled)
    first = await create(pool_stub, sandbox_id="taken")
    await full_pool(pooled)
    members = pooled.manager.warm_pool.ready_uids()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(pool_stub, sandbox_id="taken")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert pooled.manager.warm_pool.ready_uids() == members
    assert first.uid not in members


async def test_a_retried_create_returns_the_claimed_sandbox(
    pooled: Controller, pool_stub: Stub
) -> None:
    await full_pool(pooled)
    first = await create(pool_stub, request_id="retry-me-0001")
    again = await create(pool_stub, request_id="retry-me-0001")
    assert (again.name, again.uid) == (first.name, first.uid)


async def test_a_spec_the_pool_does_not_hold_starts_cold(
    pooled: Controller, pool_stub: Stub
) -> None:
    members = await full_pool(pooled)
    resources = sandbox_pb2.Resources(max_processes=100)
    sandbox = await create(
        pool_stub, sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(resources=resources))
    )
    assert sandbox.uid not in members
    assert pooled.manager.warm_pool.ready_uids() == members


async def test_a_dead_member_is_replaced_not_handed_out(
    pooled: Controller, pool_stub: Stub
) -> None:
    members = await full_pool(pooled)
    dead = sorted(members)[0]
    podman("kill", f"petri-{dead}")
    sandboxes = [await create(pool_stub) for _ in range(2)]
    for sandbox in sandboxes:
        assert sandbox.uid != dead
        assert value_of(await execute(pool_stub, sandbox.name, "1+1")) == "2"


async def test_pandas_is_imported_before_the_first_execution_and_after_a_crash(
    pooled: Controller, pool_stub: Stub
) -> None:
    await full_pool(pooled)
    sandbox = await create(pool_stub)
    check = "import sys\n[m in sys.modules for m in ('numpy', 'pandas', 'matplotlib.pyplot')]"
    assert value_of(await execute(pool_stub, sandbox.name, check)) == "[True, True, True]"
    crashed = await execute(pool_stub, sandbox.name, "import os\nos._exit(3)")
    assert crashed.error.ename  # the interpreter went away; a new one preloads too
    assert value_of(await execute(pool_stub, sandbox.name, check)) == "[True, True, True]"
    # The preload printed nothing into anyone's output.
    response = await execute(pool_stub, sandbox.name, "print('only this')")
    assert (response.stdout, response.stderr) == ("only this\n", "")


BURST = 20


async def test_a_burst_beyond_the_starts_at_once_waits_its_turn_and_every_create_succeeds(
    e2e_config: Config, controller: Controller
) -> None:
    """20 creates at once, each followed by `1+1`, on a pool of 2 and 4 starts at once: the
    creates that miss the pool wait their turn for a start instead of RESOURCE_EXHAUSTED."""
    config = sibling_config(
        e2e_config,
        controller,
        "burst",
        state_dir=e2e_config.state_dir / "burst",
        warm_pool=(PoolTarget(size=POOL_SIZE),),
        max_concurrent_creates=4,
    )
    burst = await start_controller(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{burst.port}") as channel:
            stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            await full_pool(burst)

            async def create_and_run(index: int) -> str | None:
                sandbox = await create(stub, sandbox_id=f"burst-{index}")
                return value_of(await execute(stub, sandbox.name, "1+1"))

            try:
                answers = await asyncio.gather(*(create_and_run(i) for i in range(BURST)))
                assert answers == ["2"] * BURST
                metrics = burst.manager.metrics.registry
                kind = {"profile": config.default_image_profile, "runtime": "runc"}
                hits = metrics.get_sample_value("petri_warm_pool_hits_total", kind) or 0
                misses = metrics.get_sample_value("petri_warm_pool_misses_total", kind) or 0
                assert hits >= POOL_SIZE and hits + misses == BURST
                waits = {"waiter": "create"}  # every miss took its turn for a start
                assert metrics.get_sample_value("petri_create_queue_seconds_count", waits) == misses
                assert burst.manager.create_slots.waiting == 0
            finally:
                listed = await stub.ListSandboxes(
                    sandbox_pb2.ListSandboxesRequest(parent=PARENT, page_size=100)
                )
                for sandbox in listed.sandboxes:
                    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    finally:
        await burst.stop(grace=1)
    assert not managed_uids(burst)


async def test_a_pool_members_stream_keeps_printed_output_before_the_value(
    pool_stub: Stub, pooled: Controller
) -> None:
    """What the code printed arrives before its last expression's value, in a preloaded
    interpreter too."""
    await full_pool(pooled)
    sandbox = await pool_stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))

    async def kinds(code: str) -> list[str]:
        async def requests() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
            start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code=code)
            yield sandbox_pb2.StreamExecuteCodeRequest(start=start)

        seen: list[str] = []
        async for event in pool_stub.StreamExecuteCode(requests()):
            kind = event.WhichOneof("event")
            if kind == "stdout" or kind == "output":
                seen.append(kind)
        return seen

    for code in ['print("first")\n6 * 7', 'import json\nprint("x")\n6 * 7'] * 5:
        seen = await kinds(code)
        assert seen.index("stdout") < seen.index("output"), (code, seen)
