"""Leaving an `async with` AsyncSandbox block by cancellation still deletes the sandbox, even
under a cancel scope that cancels every await after it (anyio's, as MCP servers use)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import anyio

from petri import AsyncSandbox
from petri.v1 import sandbox_pb2


class _Client:
    def __init__(self) -> None:
        self.deleted = asyncio.Event()
        self.stub = self

    async def DeleteSandbox(self, request: sandbox_pb2.DeleteSandboxRequest) -> None:
        await asyncio.sleep(0.01)  # a real call awaits the network
        self.deleted.set()

    async def call(self, method: Any, request: Any, **_: object) -> Any:
        return await method(request)


def test_a_cancelled_block_still_deletes_its_sandbox() -> None:
    async def scenario() -> None:
        client = _Client()
        info = sandbox_pb2.Sandbox(name="projects/p/sandboxes/x")
        with anyio.CancelScope() as scope:
            async with AsyncSandbox(info, cast(Any, client)):
                scope.cancel()
                await anyio.sleep(3600)
        await asyncio.wait_for(client.deleted.wait(), 10)

    anyio.run(scenario)
