"""A gateway in-process in front of fake nodes (tests/unit/gateway/fakes.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from controller.config import Config
from controller.gateway.server import Gateway, start_gateway
from petri.v1 import sandbox_pb2_grpc
from tests.unit.gateway.fakes import MemoryNodes, Outcomes

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

PARENT = "projects/alpha"
# The unit tests' gateway finds a node down within this long.
CONNECT_TIMEOUT = 0.5


def name_of(sandbox_id: str) -> str:
    return f"{PARENT}/sandboxes/{sandbox_id}"


@contextlib.asynccontextmanager
async def running_gateway(
    tmp_path: Path,
    nodes: MemoryNodes,
    holders: dict[str, str] | None = None,
    failing_locate: bool = False,
    outcomes: Outcomes | None = None,
    **config: Any,
) -> AsyncIterator[tuple[Gateway, Stub, grpc.aio.Channel]]:
    """A gateway whose registry says `holders` (sandbox id -> node name) hold the sandboxes."""
    held = holders if holders is not None else {}

    async def locate(project: str, sandbox_id: str) -> str | None:
        if failing_locate:
            raise ConnectionError("the database is not answering")
        return held.get(sandbox_id)

    gateway = await start_gateway(
        Config(
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            runtime_dir=tmp_path / "run",
            **config,
        ),
        nodes,
        locate,
        channel_for=None if outcomes is None else outcomes.channel,
        refresh_interval=0.05,
        connect_timeout=CONNECT_TIMEOUT,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    try:
        yield gateway, sandbox_pb2_grpc.SandboxServiceStub(channel), channel
    finally:
        await channel.close()
        await gateway.stop(0)
