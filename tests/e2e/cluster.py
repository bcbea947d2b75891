"""Processes of a petri cluster on one machine, for the e2e tests: `python -m controller` in role
node and in role gateway on one PostgreSQL, all under the service user's podman; and what the
tests read of it from outside (the registry's rows, podman's containers)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.config import Config
from controller.records import State
from controller.runtime.container import LABEL_REGISTRY, LABEL_UID
from controller.runtime.podman_service import PodmanService
from petri.v1 import sandbox_pb2_grpc
from tests.e2e.helpers import podman

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_SECONDS = 0.5
NODE_TIMEOUT_SECONDS = 3.0
REAP_SECONDS = 0.5
START_SECONDS = 60.0


# Ports handed out: the kernel may offer a released port again, and processes constructed
# before they start would then be given the same one.
_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never given before in this session."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def label_of(node: str) -> str:
    """The registry label of a node's containers (controller.sandboxes.provisioner)."""
    return hashlib.sha256(f"node/{node}".encode()).hexdigest()[:12]


class _Process:
    """A `python -m controller` process, SERVING once started."""

    name: str
    port: int
    log: Path
    environ: dict[str, str]

    def __init__(self, name: str, config: Config, role: str, database: str) -> None:
        self.name = name
        self.port = free_port()
        base = Path(f"{config.runtime_dir}-{name}")
        self.log = base.with_suffix(".log")
        self.environ = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PETRI_ROLE": role,
            "PETRI_DATABASE_URL": database,
            "PETRI_LISTEN": f"127.0.0.1:{self.port}",
            "PETRI_STATE_DIR": str(base / "state"),
            "PETRI_RUNTIME_DIR": str(base / "run"),
            "PETRI_DEFAULT_IMAGE_PROFILE": config.default_image_profile,
            "PETRI_HEARTBEAT_INTERVAL": f"{HEARTBEAT_SECONDS}s",
            "PETRI_NODE_TIMEOUT": f"{NODE_TIMEOUT_SECONDS}s",
        }
        self.process: asyncio.subprocess.Process | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} port={self.port}>"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller", cwd=ROOT, env=self.environ, stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        async with grpc.aio.insecure_channel(self.address) as channel:
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
            try:
                async with asyncio.timeout(60):
                    await self.process.wait()
            except TimeoutError:
                log = self.log.read_text()[-5000:]
                raise AssertionError(f"{self.name} did not stop: {log}") from None

    @contextlib.asynccontextmanager
    async def stub(self) -> AsyncIterator[Stub]:
        async with grpc.aio.insecure_channel(self.address) as channel:
            yield sandbox_pb2_grpc.SandboxServiceStub(channel)


class Node(_Process):
    """A `python -m controller` process in role node: no warm pool, no idle checkpoints, its
    sandboxes left running when it stops (a kill -9 leaves them so too). `environ` adds to or
    overrides its PETRI_* variables."""

    def __init__(
        self,
        name: str,
        config: Config,
        database: str,
        socket_path: Path,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, config, "node", database)
        self.environ |= {
            "PETRI_NODE_NAME": name,
            "PETRI_PODMAN_SOCKET": str(socket_path),
            "PETRI_IMAGE_REPOSITORY": config.image_repository,
            "PETRI_WARM_POOL": "",
            "PETRI_PRELOAD": "",
            "PETRI_CHECKPOINT_IDLE_AFTER": "0s",
            "PETRI_REAP_INTERVAL": f"{REAP_SECONDS}s",
            "PETRI_KEEP_RUNNING_ON_SHUTDOWN": "true",
            **(environ or {}),
        }


class GatewayProcess(_Process):
    """A `python -m controller` process in role gateway."""

    def __init__(self, name: str, config: Config, database: str) -> None:
        super().__init__(name, config, "gateway", database)


@contextlib.asynccontextmanager
async def podman_service(config: Config) -> AsyncIterator[Path]:
    """One podman service that all the nodes use, as controllers on one host would: its
    socket."""
    directory = Path(f"{config.runtime_dir}-nodes-{uuid.uuid4().hex[:6]}")
    directory.mkdir(mode=0o700)
    service = PodmanService("podman", directory / "podman.sock", directory / "podman.log")
    await service.start()
    try:
        yield service.socket_path
    finally:
        await service.stop()


def containers_of(nodes: Iterable[str]) -> dict[str, str]:
    """The containers podman has of these nodes (by their registry labels), running or not:
    their sandboxes' uids, each with its container's name."""
    found: dict[str, str] = {}
    for node in nodes:
        lines = podman(
            "ps", "-a", "--filter", f"label={LABEL_REGISTRY}={label_of(node)}",
            "--format", f'{{{{.Names}}}} {{{{index .Labels "{LABEL_UID}"}}}}',
        ).splitlines()  # fmt: skip
        for line in lines:
            name, _, uid = line.partition(" ")
            found[uid] = name
    return found


def remove_containers(nodes: Iterable[str]) -> None:
    """Removes every container of these nodes, whatever the tests did."""
    names = list(containers_of(nodes).values())
    if names:
        podman("rm", "-f", *names)


async def rows(database: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    """A query of the shared registry, read from outside every petri process."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        cursor = await conn.execute(sql, params)
        return list(await cursor.fetchall())


async def holder(database: str, project: str, sandbox_id: str) -> str:
    """The node the registry says holds a live sandbox."""
    found = await rows(
        database,
        f"SELECT node FROM sandboxes WHERE project = %s AND sandbox_id = %s "
        f"AND state != {int(State.DELETED)}",
        project,
        sandbox_id,
    )
    assert len(found) == 1, (project, sandbox_id, found)
    return str(found[0][0])


async def live_uids(database: str) -> set[str]:
    """The uids of the registry's live rows (not tombstones), every node's."""
    found = await rows(database, f"SELECT uid FROM sandboxes WHERE state != {int(State.DELETED)}")
    return {str(row[0]) for row in found}
