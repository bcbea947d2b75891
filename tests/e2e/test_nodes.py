"""Two controller processes in role node on one PostgreSQL and one podman: a sandbox created
on one is listed through the other, whose start leaves it alone; the first killed with
SIGKILL, the second marks its sandbox TERMINATED, naming the node, once its heartbeat is
older than --node-timeout."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.config import Config
from controller.runtime.container import LABEL_REGISTRY, LABEL_UID
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, podman, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_SECONDS = 0.5
NODE_TIMEOUT_SECONDS = 3.0
REAP_SECONDS = 0.5
START_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def label_of(node: str) -> str:
    """The registry label of a node's containers (controller.sandboxes.provisioner)."""
    return hashlib.sha256(f"node/{node}".encode()).hexdigest()[:12]


class Node:
    """A `python -m controller` process in role node."""

    def __init__(self, name: str, config: Config, database: str, socket_path: Path) -> None:
        self.name = name
        self.port = free_port()
        base = Path(f"{config.runtime_dir}-{name}")
        self.log = base.with_suffix(".log")
        self.environ = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PETRI_ROLE": "node",
            "PETRI_NODE_NAME": name,
            "PETRI_DATABASE_URL": database,
            "PETRI_LISTEN": f"127.0.0.1:{self.port}",
            "PETRI_STATE_DIR": str(base / "state"),
            "PETRI_RUNTIME_DIR": str(base / "run"),
            "PETRI_PODMAN_SOCKET": str(socket_path),
            "PETRI_IMAGE_REPOSITORY": config.image_repository,
            "PETRI_DEFAULT_IMAGE_PROFILE": config.default_image_profile,
            "PETRI_WARM_POOL": "",
            "PETRI_PRELOAD": "",
            "PETRI_CHECKPOINT_IDLE_AFTER": "0s",
            "PETRI_HEARTBEAT_INTERVAL": f"{HEARTBEAT_SECONDS}s",
            "PETRI_NODE_TIMEOUT": f"{NODE_TIMEOUT_SECONDS}s",
            "PETRI_REAP_INTERVAL": f"{REAP_SECONDS}s",
            "PETRI_KEEP_RUNNING_ON_SHUTDOWN": "true",
        }
        self.process: asyncio.subprocess.Process | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} port={self.port}>"

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "controller",
                cwd=ROOT,
                env=self.environ,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = asyncio.get_running_loop().time() + START_SECONDS
            while True:
                assert self.process.returncode is None, (
                    f"{self.name} exited: {self.log.read_text()}"
                )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                assert asyncio.get_running_loop().time() < deadline, self.log.read_text()
                await asyncio.sleep(0.2)

    async def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)
            async with asyncio.timeout(60):
                await self.process.wait()

    @contextlib.asynccontextmanager
    async def stub(self) -> AsyncIterator[Stub]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            yield sandbox_pb2_grpc.SandboxServiceStub(channel)


async def test_a_node_killed_has_its_sandbox_terminated_by_the_other_which_left_it_alone(
    e2e_config: Config, database: str, podman_socket: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    a = Node(f"e2e-a-{suffix}", e2e_config, database, podman_socket)
    b = Node(f"e2e-b-{suffix}", e2e_config, database, podman_socket)
    try:
        await a.start()
        async with a.stub() as stub_a:
            sandbox = await stub_a.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id=f"n-{suffix}")
            )
        await b.start()
        async with b.stub() as stub_b:
            # B's start adopted nothing of A's: the sandbox runs on, and B lists it.
            got = await stub_b.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
            assert got.state == sandbox_pb2.Sandbox.RUNNING
            listed = await stub_b.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
            assert sandbox.name in [s.name for s in listed.sandboxes]
            running = podman("ps", "--filter", f"label={LABEL_UID}={sandbox.uid}", "-q")
            assert running.strip(), "B's start removed A's container"
            async with a.stub() as stub_a:
                response = await stub_a.ExecuteCode(
                    sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="6 * 7")
                )
                assert value_of(response) == "42", response

            await a.stop(signal.SIGKILL)
            killed = asyncio.get_running_loop().time()
            while True:
                got = await stub_b.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
                if got.state == sandbox_pb2.Sandbox.TERMINATED:
                    break
                waited = asyncio.get_running_loop().time() - killed
                # Its last heartbeat was at most one interval before the kill.
                assert waited < NODE_TIMEOUT_SECONDS + REAP_SECONDS + 5, b.log.read_text()
                await asyncio.sleep(0.1)
            assert got.state_message.startswith(f"node {a.name} stopped answering at ")
            assert got.state_message.endswith("; its sandbox's process is gone")
    finally:
        await a.stop(signal.SIGKILL)
        await b.stop()
        names = podman(
            "ps", "-a", "--filter", f"label={LABEL_REGISTRY}={label_of(a.name)}",
            "--format", "{{.Names}}",
        ).split()  # fmt: skip
        if names:
            podman("rm", "-f", *names)
