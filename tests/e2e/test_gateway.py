"""Two gateway processes in front of two controller processes in role node, on one PostgreSQL
and one podman: a sandbox placed by one gateway is reached through the other, its code and
files go to its node, and a node killed is UNAVAILABLE through both."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.config import Config
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2
from tests.e2e.cluster import GatewayProcess, Node, holder, remove_containers
from tests.e2e.helpers import PARENT, PROJECT, value_of

MiB = 1 << 20


async def _chunks(name: str, size: int) -> AsyncIterator[files_pb2.WriteFileRequest]:
    piece = b"p" * MiB
    for index in range(size // MiB):
        yield files_pb2.WriteFileRequest(
            name=name if index == 0 else "",
            chunk=execution_pb2.FileChunk(
                path="big.bin", data=piece, final=index == size // MiB - 1
            ),
        )


async def test_gateways_place_and_route_to_real_nodes(
    e2e_config: Config, database: str, podman_socket: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    nodes = {
        name: Node(name, e2e_config, database, podman_socket)
        for name in (f"gw-a-{suffix}", f"gw-b-{suffix}")
    }
    one = GatewayProcess(f"gateway-1-{suffix}", e2e_config, database)
    two = GatewayProcess(f"gateway-2-{suffix}", e2e_config, database)
    try:
        for node in nodes.values():
            await node.start()
        await one.start()
        await two.start()
        async with one.stub() as first, two.stub() as second:
            made = [
                await first.CreateSandbox(
                    sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id=f"g{i}-{suffix}")
                )
                for i in range(4)
            ]
            holders = {
                s.name: await holder(database, PROJECT, s.name.rpartition("/")[2]) for s in made
            }
            assert set(holders.values()) <= set(nodes), holders
            for sandbox in made:  # through the other gateway, each to its own node
                response = await second.ExecuteCode(
                    sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="6 * 7")
                )
                assert value_of(response) == "42", response
            name = made[0].name
            info = await second.WriteFile(_chunks(name, 8 * MiB))
            assert info.size == 8 * MiB
            read = 0
            async for chunk in first.ReadFile(files_pb2.ReadFileRequest(name=name, path="big.bin")):
                read += len(chunk.data)
            assert read == 8 * MiB

            killed = holders[name]
            await nodes[killed].stop(signal.SIGKILL)
            # Both at once: each waits the connect timeout (3 s) for the killed node, and the
            # other node's sweep (as long after its last heartbeat) makes the sandbox TERMINATED,
            # which any node then answers for.
            gets = [
                stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name))
                for stub in (first, second)
            ]
            for refused in await asyncio.gather(*gets, return_exceptions=True):
                assert isinstance(refused, grpc.aio.AioRpcError), refused
                assert refused.code() is grpc.StatusCode.UNAVAILABLE
                assert (
                    refused.details()
                    == f"node {killed} holding the sandbox is not answering; retry"
                )
            # The other node's sandboxes still answer, through either gateway.
            for sandbox in made:
                if holders[sandbox.name] != killed:
                    got = await second.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
                    assert got.state == sandbox_pb2.Sandbox.RUNNING
    finally:
        await one.stop()
        await two.stop()
        for node in nodes.values():
            await node.stop(signal.SIGKILL)
        remove_containers(nodes)


async def test_a_sandbox_of_a_node_that_never_comes_back_is_answered_and_deleted(
    e2e_config: Config, database: str, podman_socket: Path
) -> None:
    # Once the other node's sweep terminated it, the gateway answered UNAVAILABLE "retry" for
    # every call to it, for ever: its node is gone, and any node can say what became of it.
    suffix = uuid.uuid4().hex[:6]
    nodes = {
        name: Node(name, e2e_config, database, podman_socket)
        for name in (f"gone-a-{suffix}", f"gone-b-{suffix}")
    }
    gateway = GatewayProcess(f"gone-gateway-{suffix}", e2e_config, database)
    try:
        for node in nodes.values():
            await node.start()
        await gateway.start()
        async with gateway.stub() as stub:
            sandbox = await stub.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id=f"gone-{suffix}")
            )
            killed = await holder(database, PROJECT, f"gone-{suffix}")
            await nodes[killed].stop(signal.SIGKILL)
            get = sandbox_pb2.GetSandboxRequest(name=sandbox.name)
            async with asyncio.timeout(30):  # UNAVAILABLE until the other node's sweep
                while True:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        got = await stub.GetSandbox(get)
                        if got.state == sandbox_pb2.Sandbox.TERMINATED:
                            break
                    await asyncio.sleep(0.2)
            assert got.state_message.startswith(f"node {killed} stopped answering at ")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ExecuteCode(sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="1"))
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details() == f"sandbox {sandbox.name} is TERMINATED: " + (
                got.state_message
            )
            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.GetSandbox(get)
            assert gone.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        await gateway.stop()
        for node in nodes.values():
            await node.stop(signal.SIGKILL)
        remove_containers(nodes)
