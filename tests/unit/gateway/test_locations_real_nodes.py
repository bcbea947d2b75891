"""The gateway's remembered locations in front of two real nodes (the fast tier's controllers in
role node) on a real PostgreSQL: a sandbox deleted and made again on the other node is reached
there, the node the gateway remembered refusing it as a real node does."""

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from controller.gateway.forward import locate_in
from controller.gateway.server import start_gateway
from controller.store.nodes import PostgresNodes
from controller.store.postgres import PostgresRegistry
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.postgres import fresh_database
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.inprocess import (
    PARENT,
    PROFILE,
    PROJECT,
    REPOSITORY,
    fast_config,
    serving,
    short_runtime_dir,
)
from tests.unit.controller.test_nodes import node_config
from tests.unit.gateway.test_nodes_behind_gateway import _sees


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    """The session's PostgreSQL, with tables of this test's own."""
    yield from fresh_database(postgres_url)


async def test_a_sandbox_made_again_on_another_node_is_reached_there(
    tmp_path: Path, database: str
) -> None:
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})
    registry = PostgresRegistry(database)
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            async with (
                serving(node_config(tmp_path, database, "a", dir_a), runtime),
                serving(node_config(tmp_path, database, "b", dir_b), runtime),
            ):
                await registry.open()
                nodes = PostgresNodes(registry)
                config = fast_config(
                    tmp_path / "gateway", dir_a, database_url=database, role="gateway"
                )
                gateway = await start_gateway(
                    config,
                    nodes,
                    locate_in(registry),
                    stale_after=timedelta(seconds=1),
                    refresh_interval=0.05,
                    connect_timeout=0.5,
                )
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
                stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
                name = f"{PARENT}/sandboxes/s1"
                create = sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id="s1")
                run = sandbox_pb2.ExecuteCodeRequest(name=name, code="x = 1")
                try:
                    await _sees(gateway, a=(False, 0), b=(False, 0))
                    assert await nodes.set_draining("b", True)
                    await _sees(gateway, a=(False, 0), b=(True, 0))
                    await stub.CreateSandbox(create)
                    assert (await stub.ExecuteCode(run)).stdout == "ran x = 1\n"  # on A
                    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name))
                    assert await nodes.set_draining("b", False)
                    assert await nodes.set_draining("a", True)
                    await _sees(gateway, a=(True, 0), b=(False, 0))
                    await stub.CreateSandbox(create)
                    record = await registry.get_live(PROJECT, "s1")
                    assert record is not None and record.node == "b"
                    # The gateway remembers A: A refuses, the call goes on to B.
                    assert (await stub.ExecuteCode(run)).stdout == "ran x = 1\n"
                    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name))
                    assert got.uid == record.uid
                    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name))
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.ExecuteCode(run)
                    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
                finally:
                    await channel.close()
                    await gateway.stop(0)
    finally:
        await registry.close()
        await runtime.shutdown()
