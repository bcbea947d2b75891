"""A gateway in front of two real nodes (the fast tier's controllers in role node: the real
service, a fake podman, stand-in executors) sharing a real PostgreSQL: the gateway reads the
nodes' heartbeats and each sandbox's node from the registry, places creates on nodes that are
not draining, routes every later call to the sandbox's node, and says a node that stopped
answering is not answering."""

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from controller.gateway.forward import locate_in
from controller.gateway.server import Gateway, start_gateway
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
    eventually,
    fast_config,
    serving,
    short_runtime_dir,
)
from tests.unit.controller.test_nodes import node_config


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    """The session's PostgreSQL, with tables of this test's own."""
    yield from fresh_database(postgres_url)


async def _sees(gateway: Gateway, **expected: tuple[bool, int]) -> None:
    """Waits until the gateway's view has these nodes live, with (draining, sandboxes)."""

    async def check() -> bool | None:
        for name, (draining, sandboxes) in expected.items():
            node = gateway.directory.live(name)
            if node is None or (node.draining, node.sandboxes) != (draining, sandboxes):
                return None
        return True

    await eventually(check, f"the gateway to see {expected}")


async def test_a_gateway_places_on_live_nodes_and_routes_to_each_sandbox_s_node(
    tmp_path: Path, database: str
) -> None:
    runtime = FakeRuntime({f"{REPOSITORY}:{PROFILE}"})  # one podman, as on one host
    registry = PostgresRegistry(database)
    try:
        with short_runtime_dir() as dir_a, short_runtime_dir() as dir_b:
            async with (
                serving(node_config(tmp_path, database, "a", dir_a), runtime) as a,
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
                try:

                    async def create(sandbox_id: str, node: str) -> str:
                        made = await stub.CreateSandbox(
                            sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id=sandbox_id)
                        )
                        record = await registry.get_live(PROJECT, sandbox_id)
                        assert record is not None and record.node == node, sandbox_id
                        return made.name

                    await _sees(gateway, a=(False, 0), b=(False, 0))  # both have heartbeated
                    assert await nodes.set_draining("b", True)
                    await _sees(gateway, a=(False, 0), b=(True, 0))
                    first = await create("first", "a")
                    await _sees(gateway, a=(False, 1), b=(True, 0))
                    # B has fewer sandboxes, but it drains: A again.
                    await create("second", "a")
                    assert await nodes.set_draining("b", False)
                    assert await nodes.set_draining("a", True)

                    async def a_draining() -> bool | None:
                        node = gateway.directory.live("a")
                        return True if node is not None and node.draining else None

                    await eventually(a_draining, "the gateway to see A draining")
                    placed = {"b": await create("third", "b")}
                    # A's two sandboxes move to B, the only other node; undrained, A is the
                    # emptier one again.
                    await _sees(gateway, a=(True, 0), b=(False, 3))
                    assert await nodes.set_draining("a", False)
                    await _sees(gateway, a=(False, 0), b=(False, 3))
                    moved = await registry.get_live(PROJECT, first.rpartition("/")[2])
                    assert moved is not None and moved.node == "b"
                    placed["a"] = await create("fourth", "a")
                    for node, name in placed.items():
                        ran = await stub.ExecuteCode(
                            sandbox_pb2.ExecuteCodeRequest(name=name, code=f"on {node}")
                        )
                        assert ran.stdout == f"ran on {node}\n"
                    listed = await stub.ListSandboxes(
                        sandbox_pb2.ListSandboxesRequest(parent=PARENT)
                    )
                    assert len(listed.sandboxes) == 4

                    # A stops answering (its heartbeats go on): nothing is forwarded to it.
                    await a.controller.server.stop(0)
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=placed["a"]))
                    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                    assert caught.value.details() == (
                        "node a holding the sandbox is not answering; retry"
                    )
                    # B's sandbox is B's business: deleted through the gateway, gone from it.
                    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=placed["b"]))
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=placed["b"]))
                    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
                finally:
                    await channel.close()
                    await gateway.stop(0)
    finally:
        await registry.close()
        await runtime.shutdown()
