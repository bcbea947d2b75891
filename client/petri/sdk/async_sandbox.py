""":class:`AsyncSandbox`: a handle on one sandbox, with coroutine methods (asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from types import TracebackType

import grpc

from petri.sdk.connection import CREATE_TIMEOUT, AsyncClient, default_async_client
from petri.sdk.errors import error_from_rpc
from petri.sdk.execution import Execution, ExecutionAssembler, OutputCallback, TextCallback
from petri.sdk.files import AsyncFiles
from petri.sdk.inputs import FileSource, async_iterate
from petri.sdk.requests import (
    Seconds,
    create_request,
    run_deadline,
    run_requests,
    sandbox_name,
    update_request,
)
from petri.sdk.resources import Resources
from petri.sdk.sandbox import state_name
from petri.v1 import sandbox_pb2

__all__ = ["AsyncSandbox"]


class AsyncSandbox:
    """A sandbox, for asyncio code: :class:`petri.Sandbox`'s methods as coroutines.

    ::

        async with await AsyncSandbox.create() as sb:
            print((await sb.run("1 + 1")).text)
    """

    def __init__(self, info: sandbox_pb2.Sandbox, client: AsyncClient, keep: bool = False) -> None:
        self.info = info
        self.client = client
        self.keep = keep
        self.files = AsyncFiles(client, info.name)

    @property
    def name(self) -> str:
        """The full name, e.g. "projects/default/sandboxes/x"."""
        return self.info.name

    @property
    def sandbox_id(self) -> str:
        """The last part of the name, e.g. "x"."""
        return self.info.name.rsplit("/", 1)[-1]

    @property
    def state(self) -> str:
        """The state's name as of :attr:`info`: "RUNNING", "PAUSED"... (see :meth:`refresh`)."""
        return state_name(self.info)

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.name} {self.state}>"

    @classmethod
    async def create(
        cls,
        profile: str | None = None,
        runtime: str | None = None,
        ttl: Seconds | None = None,
        labels: Mapping[str, str] | None = None,
        resources: Resources | None = None,
        sandbox_id: str | None = None,
        display_name: str | None = None,
        auto_pause_after: Seconds | None = None,
        keep: bool = False,
        client: AsyncClient | None = None,
    ) -> AsyncSandbox:
        """As :meth:`petri.Sandbox.create`."""
        client = client or default_async_client()
        request = create_request(
            client.project,
            profile=profile,
            runtime=runtime,
            ttl=ttl,
            labels=labels,
            resources=resources,
            sandbox_id=sandbox_id,
            display_name=display_name,
            auto_pause_after=auto_pause_after,
        )
        info = await client.call(
            client.stub.CreateSandbox, request, timeout=CREATE_TIMEOUT, retry=True
        )
        return cls(info, client, keep=keep)

    @classmethod
    async def connect(cls, name: str, client: AsyncClient | None = None) -> AsyncSandbox:
        """As :meth:`petri.Sandbox.connect`."""
        client = client or default_async_client()
        request = sandbox_pb2.GetSandboxRequest(name=sandbox_name(client.project, name))
        info = await client.call(client.stub.GetSandbox, request, retry=True)
        return cls(info, client, keep=True)

    @classmethod
    async def list(
        cls, filter: str = "", client: AsyncClient | None = None
    ) -> AsyncIterator[AsyncSandbox]:
        """As :meth:`petri.Sandbox.list`: ``async for sb in AsyncSandbox.list(): ...``."""
        client = client or default_async_client()
        token = ""
        while True:
            response = await client.call(
                client.stub.ListSandboxes,
                sandbox_pb2.ListSandboxesRequest(
                    parent=f"projects/{client.project}", filter=filter, page_token=token
                ),
                retry=True,
            )
            for info in response.sandboxes:
                yield cls(info, client, keep=True)
            token = response.next_page_token
            if not token:
                return

    async def refresh(self) -> AsyncSandbox:
        """As :meth:`petri.Sandbox.refresh`."""
        self.info = await self.client.call(
            self.client.stub.GetSandbox, sandbox_pb2.GetSandboxRequest(name=self.name), retry=True
        )
        return self

    async def update(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        ttl: Seconds | None = None,
        display_name: str | None = None,
        auto_pause_after: Seconds | None = None,
    ) -> AsyncSandbox:
        """As :meth:`petri.Sandbox.update`."""
        request = update_request(
            self.name,
            labels=labels,
            ttl=ttl,
            display_name=display_name,
            auto_pause_after=auto_pause_after,
        )
        self.info = await self.client.call(self.client.stub.UpdateSandbox, request)
        return self

    async def delete(self, missing_ok: bool = False) -> None:
        """As :meth:`petri.Sandbox.delete`."""
        request = sandbox_pb2.DeleteSandboxRequest(name=self.name, allow_missing=missing_ok)
        await self.client.call(self.client.stub.DeleteSandbox, request)

    async def pause(self) -> AsyncSandbox:
        """As :meth:`petri.Sandbox.pause`."""
        request = sandbox_pb2.PauseSandboxRequest(name=self.name)
        self.info = await self.client.call(self.client.stub.PauseSandbox, request, timeout=None)
        return self

    async def resume(self) -> AsyncSandbox:
        """As :meth:`petri.Sandbox.resume`."""
        request = sandbox_pb2.ResumeSandboxRequest(name=self.name)
        self.info = await self.client.call(
            self.client.stub.ResumeSandbox, request, timeout=CREATE_TIMEOUT
        )
        return self

    async def run(
        self,
        code: str,
        files: Mapping[str, FileSource] | None = None,
        timeout: Seconds | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        on_output: OutputCallback | None = None,
    ) -> Execution:
        """As :meth:`petri.Sandbox.run`; the callbacks are plain functions, called in the event
        loop as events arrive; local input files are read in a worker thread. Cancelling the
        task cancels the call, which interrupts the code."""
        assembler = ExecutionAssembler(on_stdout, on_stderr, on_output)
        call = self.client.stub.StreamExecuteCode(
            async_iterate(run_requests(self.name, code, timeout, files)),
            timeout=run_deadline(timeout),
            metadata=self.client.metadata,
        )
        try:
            async for event in call:
                assembler.add(event)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()
        return assembler.result()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.keep:
            # Shielded: a block left by cancellation (a timeout, a cancel scope that cancels
            # every await after it) still deletes its sandbox.
            await asyncio.shield(self.delete(missing_ok=True))
