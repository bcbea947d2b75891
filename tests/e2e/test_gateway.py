"""Two gateway processes in front of two controller processes in role node, on one PostgreSQL
and one podman: a sandbox placed by one gateway is reached through the other, its code and
files go to its node, and a node killed is UNAVAILABLE through both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.config import Config
from controller.runtime.container import LABEL_REGISTRY
from controller.store.postgres import PostgresRegistry
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, podman, value_of
from tests.e2e.test_nodes import (
    NODE_TIMEOUT_SECONDS,
    ROOT,
    START_SECONDS,
    Node,
    free_port,
    label_of,
)

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

MiB = 1 << 20


class GatewayProcess:
    """A `python -m controller` process in role gateway."""

    def __init__(self, name: str, config: Config, database: str) -> None:
        self.port = free_port()
        base = Path(f"{config.runtime_dir}-{name}")
        self.log = base.with_suffix(".log")
        self.environ = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PETRI_ROLE": "gateway",
            "PETRI_DATABASE_URL": database,
            "PETRI_LISTEN": f"127.0.0.1:{self.port}",
            "PETRI_STATE_DIR": str(base / "state"),
            "PETRI_RUNTIME_DIR": str(base / "run"),
            "PETRI_DEFAULT_IMAGE_PROFILE": config.default_image_profile,
            "PETRI_NODE_TIMEOUT": f"{NODE_TIMEOUT_SECONDS}s",
            "PETRI_HEARTBEAT_INTERVAL": "0.5s",
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller", cwd=ROOT, env=self.environ, stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = asyncio.get_running_loop().time() + START_SECONDS
            while True:
                assert self.process.returncode is None, self.log.read_text()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                assert asyncio.get_running_loop().time() < deadline, self.log.read_text()
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                await self.process.wait()

    @contextlib.asynccontextmanager
    async def stub(self) -> AsyncIterator[Stub]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            yield sandbox_pb2_grpc.SandboxServiceStub(channel)


async def _chunks(name: str, size: int) -> AsyncIterator[files_pb2.WriteFileRequest]:
    piece = b"p" * MiB
    for index in range(size // MiB):
        yield files_pb2.WriteFileRequest(
            name=name if index == 0 else "",
            chunk=execution_pb2.FileChunk(
                path="big.bin", data=piece, final=index == size // MiB - 1
            ),
        )


async def _holder(database: str, sandbox_id: str) -> str:
    registry = PostgresRegistry(database, max_connections=1)
    await registry.open()
    try:
        record = await registry.get_live(PARENT.removeprefix("projects/"), sandbox_id)
        assert record is not None, sandbox_id
        return record.node
    finally:
        await registry.close()


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
            holders = {s.name: await _holder(database, s.name.rpartition("/")[2]) for s in made}
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
            for stub in (first, second):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name))
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                assert caught.value.details() == (
                    f"node {killed} holding the sandbox is not answering; retry"
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
            names = podman(
                "ps", "-a", "--filter", f"label={LABEL_REGISTRY}={label_of(node.name)}",
                "--format", "{{.Names}}",
            ).split()  # fmt: skip
            if names:
                podman("rm", "-f", *names)
